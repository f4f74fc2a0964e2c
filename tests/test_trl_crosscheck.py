"""Our pairwise loss equals TRL's DPOTrainer loss on the very same batch (TRL, dev extra)."""

import pytest
import torch

from emdpo_ray.core.losses import pl_dpo_loss
from conftest import sequence_logps


@pytest.mark.slow
def test_pairs_match_trl_dpotrainer_loss(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from emdpo_ray.models.tiny import train_tokenizer

    texts = ["Explain tides.", "The moon pulls the sea.", "Water goes up and down.",
             "Describe bees.", "Bees make honey.", "They buzz around."]
    tok = train_tokenizer(texts * 20, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    ds = Dataset.from_list([
        {"prompt": "Explain tides.", "chosen": "The moon pulls the sea.",
         "rejected": "Water goes up and down."},
        {"prompt": "Describe bees.", "chosen": "Bees make honey.", "rejected": "They buzz around."},
    ])
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, beta=0.3,
                     report_to=[], use_cpu=True, max_length=64)
    import copy

    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                         train_dataset=ds, processing_class=tok)
    with torch.no_grad():  # move the policy away from TRL's frozen reference copy
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
        ids, mask = batch["input_ids"], batch["completion_mask"]
        att = batch.get("attention_mask", torch.ones_like(ids))
        pol, _ = sequence_logps(trainer.model, ids, att, mask)
        ref, _ = sequence_logps(trainer.ref_model, ids, att, mask)
    b = ids.shape[0] // 2  # TRL stacks [chosen..., rejected...]
    ours, _ = pl_dpo_loss(torch.stack([pol[:b], pol[b:]], 1), torch.stack([ref[:b], ref[b:]], 1),
                          torch.ones(b), beta=0.3)
    assert abs(float(theirs) - float(ours)) < 1e-4, (float(theirs), float(ours))
    assert abs(float(ours) - 0.6931) > 1e-3  # not the trivial policy == reference point
