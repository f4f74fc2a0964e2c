"""Configuration: one pydantic model per concern, loaded from YAML, overridden by `--set`.

    cfg = load_config("jobs/demo.yaml", ["dpo.beta=0.2", "em.max_iterations=3"])

Unknown keys and bad values fail here, before any Ray worker starts, with the key path.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat,
                      ValidationError, model_validator)


class ConfigError(ValueError):
    """A configuration file or override is invalid. `str()` names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    user_field: str = Field("user_id", min_length=1, description=(
        "The column naming each record's annotator (user). Records without it are refused."))
    max_prompt_tokens: int = Field(64, gt=0, description=(
        "Prompts longer than this many tokens keep their last tokens (the part next to the "
        "response); truncations are counted in the log."))
    max_response_tokens: int = Field(64, gt=0, description=(
        "Responses longer than this many tokens keep their first tokens (plus end-of-text)."))


class LoraSettings(_Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "LoRA dropout. Must be 0 for the batched multi-adapter path (PEFT only mixes adapters "
        "per row in eval mode)."))
    target_modules: list[str] | str = Field("all-linear", description=(
        "Module names to adapt, or 'all-linear'."))


class TinyModelSettings(_Section):
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary trained on the records.")
    hidden_size: int = Field(48, gt=0, description="Hidden width of the default tiny Llama.")
    intermediate_size: int = Field(96, gt=0, description="MLP width of the tiny Llama.")
    num_hidden_layers: int = Field(2, gt=0, description="Layers of the tiny Llama.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads of the tiny Llama.")
    num_key_value_heads: int = Field(2, gt=0, description="KV heads of the tiny Llama.")
    sft_epochs: float = Field(2.0, ge=0, description=(
        "Passes of supervised fine-tuning on the records' prompts and responses that make "
        "the tiny model a language model before any DPO (its reference). 0 leaves it "
        "random: every policy then writes noise (an ablation, not a setting). More passes "
        "write more fluent text but make the policies' likelihoods of new rankings less "
        "reliable for type inference (docs/sft_reference.md)."))


class ModelConfig(_Section):
    name_or_path: str | None = Field(None, description=(
        "Hugging Face id or local directory of the base (reference) model. None builds a tiny "
        "Llama and a byte-level BPE from the training records, inside the run directory."))
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path.")
    finetune: Literal["lora", "full"] = Field("lora", description=(
        "'lora': K adapters on one shared base (reference = adapters disabled). "
        "'full': K full copies plus a frozen reference."))
    lora: LoraSettings = Field(default_factory=LoraSettings)
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings)
    trust_remote_code: bool = Field(False, description=(
        "Run Python code shipped with a model (auto_map). Off: such models are refused."))
    allow_pickle: bool = Field(False, description=(
        "Load weights from pickle files (pytorch_model.bin, adapter_model.bin). Off: "
        "safetensors only, since unpickling runs arbitrary code."))
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "'auto' is float32 on CPU and bfloat16 on GPU."))
    sft_epochs: float = Field(0.0, ge=0, description=(
        "Supervised fine-tuning of a named model (name_or_path) on the records before DPO; "
        "the result becomes the run's base_model/ and the reference. The default tiny model "
        "uses model.tiny.sft_epochs instead."))
    sft_on: Literal["all", "top"] = Field("all", description=(
        "SFT on every response of every record, or on each record's top-ranked one."))
    sft_batch_size: int = Field(64, gt=0, description="Responses per SFT step.")
    sft_learning_rate: float | None = Field(None, gt=0, description=(
        "SFT AdamW learning rate; None: 2e-5 for a named model, and for the tiny model 5e-3 "
        "at width 48, scaled as 1/model.tiny.hidden_size (a wider tiny model at 5e-3 loses "
        "which words its states read)."))

    @property
    def sft_passes(self) -> float:
        """SFT epochs that apply to this model (tiny or named)."""
        return self.sft_epochs if self.name_or_path else self.tiny.sft_epochs


class DPOConfig(_Section):
    beta: float = Field(1.0, gt=0, description="KL strength: reward = beta * log(pi/pi_ref).")
    learning_rate: float = Field(1e-3, gt=0, description=(
        "AdamW learning rate. 5e-3 fits the training rankings faster but the policies then "
        "predict new rankings worse than chance (docs/starts.md)."))
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(2.0, gt=0, description="Passes over the records in the first M-step.")
    min_steps: int = Field(60, ge=1, description=(
        "Lower bound on optimizer steps per M-step, so small datasets still train enough."))
    batch_size: int = Field(32, gt=0, description="Records per optimizer step per worker.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    sft_weight: float = Field(0.0, ge=0, description=(
        "Adds sft_weight * NLL of the top-ranked response (per token) to the loss."))


class EMConfig(_Section):
    max_iterations: int = Field(3, ge=1, description="EM iterations (M-step + E-step each).")
    init: Literal["kmeans", "random", "labels"] = Field("kmeans", description=(
        "'kmeans': k-means on per-user preference embeddings; 'random': random hard "
        "assignments, best of em.restarts by log-likelihood; 'labels': from true_type."))
    init_refine_iterations: int = Field(20, ge=0, description=(
        "After k-means, EM iterations of a linear Plackett-Luce mixture on the same "
        "features (cheap, no language model); 0 keeps plain k-means."))
    init_features: Literal["auto", "language", "tokens", "tokens_by_prompt",
                           "tokens_by_prompt_state", "reference", "reference_by_prompt_state",
                           "both"] = Field("auto", description=(
            "What the kmeans start clusters on: 'tokens' (bag-of-tokens counts), "
            "'tokens_by_prompt' (the counts, and the same counts times the prompt's words' "
            "coordinates along which users' preferences co-vary: preferences that change with "
            "the prompt), 'tokens_by_prompt_state' (the same with the reference's state of the "
            "prompt, which sees word order), 'reference' (the reference's middle-layer states "
            "and token embeddings, em.init_layers, pooled by em.init_pooling), "
            "'reference_by_prompt_state' (those crossed with the prompt's state), 'both' "
            "(tokens and reference); 'auto': the one of tokens, the two *_by_prompt*, "
            "reference and both whose start best predicts held-out rankings (train/start.py); "
            "'language': the same of reference and reference_by_prompt_state, no counts."))
    init_pooling: Literal["sentences", "thirds"] = Field("sentences", description=(
        "How the start's 'reference' features pool a response's states: 'sentences', over "
        "its first sentence, its middle sentences and its last (sentences end at '.', '!', "
        "'?' or a new line), or 'thirds', over the first, middle and last third of its "
        "tokens, for text with no sentences (docs/start_features-order-sentences.md)."))
    init_layers: list[Literal["embeddings", "middle", "last"]] = Field(
        ["middle", "embeddings"], min_length=1, description=(
            "The layers whose states the start's 'reference' features pool, side by side: "
            "the middle (words in context) and the token embeddings (which words, kept only "
            "in part by the middle layer; docs/start_layers-order.md)."))
    init_sft_epochs: float | None = Field(None, ge=0, description=(
        "Passes of further SFT, on the records' responses, of a copy of the reference whose "
        "states are the start's 'reference' features (the reference itself is unchanged): "
        "a reference trained longer carries the order of a response's sentences "
        "(docs/start_features-order-levers.md; one pass better than two, four or eight: "
        "docs/start_features-order-passes.md). None: 1 for the default tiny model, 0 for a "
        "named one; 0: the reference's own states."))
    init_restarts: int = Field(4, ge=1, description=(
        "Starts of the kmeans start's linear mixture: k-means, then random partitions, each "
        "run 5 iterations; the one of highest log-likelihood runs on to "
        "em.init_refine_iterations. 8, 4 and 2 gave the same start on every family and seed "
        "of docs/start_cost.md and docs/start_cost-k4.md (3 and 4 types); 4 keeps a margin "
        "at about 70% of 8's cost."))
    init_split_merge: int = Field(6, ge=0, description=(
        "Split-and-merge moves of the kmeans start's linear mixture tried per round (merge "
        "two alike types, split another; kept when the log-likelihood rises by more than a "
        "nat; train/linear_mixture.py). 0: none."))
    init_l2: list[NonNegativeFloat] | None = Field(None, min_length=1, description=(
        "L2 penalties of the kmeans start's linear mixture, walked from the strongest down, "
        "each fit continuing from the last; the one whose mixture best predicts held-out "
        "rankings is kept (train/start.py). None: 1e-2, 1e-3, 1e-4, and 1 and 0.1 before "
        "them for reference_by_prompt_state (language), whose 1,440 dense dimensions "
        "overfit at 1e-2 (docs/start_language-weak-l2.md)."))
    max_types: int = Field(6, ge=1, description=(
        "Largest K that `train --types auto` tries: K grows from 1 while one more type of the "
        "start's linear mixture predicts held-out rankings better beyond noise, on each of "
        "the em.init_features candidates (train/num_types.py)."))
    restarts: int = Field(3, ge=1, description="Random starts tried by init=random.")
    init_smoothing: float = Field(0.05, ge=0, lt=1, description=(
        "Initial posteriors are (1 - s) on the assigned type and s spread over the others."))
    tol_loglik: float = Field(1e-4, ge=0, description=(
        "Stop when |delta log-likelihood| / |log-likelihood| falls below this ..."))
    tol_posterior: float = Field(1e-3, ge=0, description="... and max |delta gamma| below this.")
    guard_holdout: float = Field(0.2, ge=0, lt=1, description=(
        "Share of each user's rankings kept out of every M-step. New types are kept only if "
        "their policies predict these (from the user's other rankings) better beyond noise "
        "(em.guard_level) than the model behind the current types (the start's mixture or "
        "the last policies); else EM stops there. 0: no check, train on every ranking."))
    guard_level: float = Field(0.9, ge=0, lt=1, description=(
        "The guard keeps new types when the lower end of this interval (resampling users) of "
        "their gain in held-out log-likelihood per ranking, paired per user, is above 0: at "
        "0.9, a one-sided test at 5%. 0: any gain in the mean, as before this test existed."))
    reward_temperature: Literal["fit"] | PositiveFloat = Field(1.0, description=(
        "Scale of the policies' rewards when the E-step and the guard score rankings. 1: as "
        "trained. 'fit': each iteration, the scale that best predicts the guard's held-out "
        "rankings (core/calibration.py; the guard scores each half of the users at the other "
        "half's scale; 1 without held-out rankings). Off: on contextual types it predicts a "
        "little better and recovers a little worse (docs/type_recovery.md)."))
    warm_start: bool = Field(True, description=(
        "Start each M-step from the previous iteration's policies (else from the base)."))
    warm_epochs: float = Field(1.0, gt=0, description=(
        "Passes over the records in warm-started M-steps (after the first)."))
    final_epochs: float = Field(4.0, ge=0, description=(
        "After EM: passes over every record (held-out ones included) training the policies "
        "on the final types, warm from the last M-step: EM's M-steps are kept short, the "
        "served policies need more (README: 'Do the policies serve their types?'). 0: none."))
    cross_fit: bool = Field(False, description=(
        "Score each user with policies trained without that user (two folds), so a policy "
        "cannot simply confirm the users it was trained on. Doubles compute, not fits; pays "
        "off when each type has enough records for its policy to generalise."))


class MMRAConfig(_Section):
    num_prompts: int = Field(24, gt=0, description="Held-out prompts used to estimate L.")
    prompts_file: str | None = Field(None, description=(
        "Held-out prompts for L: a text file (one prompt a line) or JSONL with a 'prompt' "
        "field. None: the data's synthetic sidecar prompts (never used in training), else "
        "the training prompts, with a warning and `prompt_source: training` in mmra.json."))
    samples_per_prompt: int = Field(4, gt=0, description=(
        "Generations per prompt and policy (the reference included: `eval` scores them)."))
    max_new_tokens: int | None = Field(None, gt=0, description=(
        "Length cap of each generation. None: data.max_response_tokens, the longest response "
        "the policies were trained on (a shorter cap hides preferences about length)."))
    temperature: float = Field(1.0, gt=0, description=(
        "Sampling temperature for L. 1.0 samples pi_j itself, as L is defined; anything "
        "else is reported in mmra.json."))
    top_p: float = Field(1.0, gt=0, le=1, description=(
        "Nucleus truncation of the samples for L. 1.0 (no truncation, no top-k) samples "
        "pi_j exactly; anything else is reported in mmra.json."))
    bootstrap: int = Field(200, ge=0, description=(
        "Bootstrap replicates over prompts for the intervals of L, the weights and the max "
        "regret in mmra.json (0: none)."))
    type_weights: list[float] | None = Field(None, description="Per-type regret weights c_i.")
    single_dpo_baseline: bool = Field(False, description=(
        "Also train one DPO policy on all data without types, as a baseline in mmra.json."))
    enabled: bool = Field(True, description="Run MMRA at the end of `emdpo-ray train`.")


class DeploymentSettings(_Section):
    num_replicas: int | None = Field(None, ge=1, description=(
        "Fixed replica count; None uses autoscaling_config."))
    autoscaling_config: dict = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2,
                                 "target_ongoing_requests": 8},
        description="Ray Serve autoscaling_config (ignored when num_replicas is set).")
    ray_actor_options: dict = Field(default_factory=lambda: {"num_cpus": 1}, description=(
        "Ray Serve ray_actor_options, e.g. {num_cpus: 2} or {num_gpus: 1}."))
    max_ongoing_requests: int = Field(64, ge=1, description="Requests queued per replica.")
    health_check_period_s: float = Field(5.0, gt=0, description=(
        "How often Serve checks each replica; a dead one is replaced after a failed check."))


class ServeConfig(_Section):
    known_users: Literal["map", "sample"] = Field("map", description=(
        "Known users go to their MAP type, or to a type sampled from their posterior."))
    max_tokens_limit: int = Field(256, gt=0, description="Largest max_tokens a request may ask.")
    default_max_tokens: int = Field(32, gt=0, description="max_tokens when a request omits it.")
    max_body_bytes: int = Field(65536, gt=0, description="Larger request bodies get 413.")
    api_key: str | None = Field(None, description="Bearer token (or env EMDPO_API_KEY).")
    min_confidence: float = Field(0.5, ge=0, description=(
        "A user whose posterior entropy (nats) is above this keeps MMRA routing."))
    max_online_users: int = Field(100_000, ge=1, description=(
        "Users whose posterior is learned online; the least recently updated are evicted."))
    max_feedback_history: int = Field(32, ge=1, description=(
        "Recent feedback records kept per user (older ones are dropped)."))
    snapshot_every: int = Field(100, ge=1, description=(
        "Online updates between atomic snapshots of the user state (a write-ahead log "
        "keeps every acknowledged update in between)."))
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field("EveryNode", description=(
        "Where Serve runs HTTP proxies: every node (a load balancer in front), or the head."))
    state_actor_options: dict = Field(default_factory=dict, description=(
        "Ray actor options of the online user-state actor, e.g. {resources: {state: 0.01}} "
        "to keep it off nodes that may go away; its journal is on the run's storage."))
    max_batch_size: int = Field(16, ge=1, description=(
        "Requests for any mix of types decoded together in one batched forward."))
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Wait to fill a batch.")
    request_timeout_s: float = Field(60.0, gt=0, description=(
        "A request not answered by then gets 503 with Retry-After (never a hang)."))
    retries: int = Field(5, ge=0, description=(
        "Retries of a request whose policy replica died (backoff 0.25 s, doubling), within "
        "request_timeout_s: enough to ride out Serve replacing the replica."))
    policy: DeploymentSettings = Field(default_factory=DeploymentSettings)
    router: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(
        ray_actor_options={"num_cpus": 0.1}))


class RayConfig(_Section):
    address: str | None = Field(None, description=(
        "Ray cluster address; None joins RAY_ADDRESS if set, else starts a local Ray."))
    num_workers: int = Field(1, ge=1, description=(
        "DeepSpeed workers (resident Ray actors, one per rank) for the M-steps."))
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker.")
    use_gpu: bool = Field(False, description="One GPU per worker; NCCL + bf16 when on.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    storage_path: str | None = Field(None, description=(
        "Where M-step checkpoints go (local path or s3://...). None: <run_dir>/ray_results."))
    max_failures: int = Field(2, ge=-1, description=(
        "Worker-group replacements per M-step after a lost worker; -1: unlimited."))
    checkpoint_every_steps: int = Field(25, ge=0, description=(
        "Steps between mid-M-step checkpoints (a restarted worker group resumes from the "
        "last one); 0: only the final checkpoint."))
    worker_start_timeout_s: float = Field(600.0, gt=0, description=(
        "How long the M-step worker group may wait for its CPUs/GPUs (an autoscaling "
        "cluster adds nodes meanwhile) before a clear error."))
    dashboard: bool = Field(False, description=(
        "Start the Ray dashboard (and job API) with the local Ray; bound to 127.0.0.1."))


class Config(_Section):
    seed: int = Field(0, description="Seeds data order, initialisation and training.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    em: EMConfig = Field(default_factory=EMConfig)
    mmra: MMRAConfig = Field(default_factory=MMRAConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _compatible(self) -> "Config":
        if self.model.finetune == "lora" and self.model.lora.dropout > 0:
            raise ValueError(
                "model.lora.dropout must be 0: the K adapters are trained and scored in one "
                "batched forward (PEFT adapter_names per row), which PEFT only allows without "
                "dropout. Set model.lora.dropout=0.")
        if self.model.gguf_file and not self.model.name_or_path:
            raise ValueError("model.gguf_file needs model.name_or_path (the folder holding it)")
        return self

    @property
    def start_layers(self) -> tuple[int | None, ...]:  # hidden-state indices, None the middle
        return tuple({"embeddings": 0, "middle": None, "last": -1}[x] for x in self.em.init_layers)

    @property
    def start_sft_passes(self) -> float:
        """em.init_sft_epochs as it applies to this model (tiny or named)."""
        if self.em.init_sft_epochs is not None:
            return self.em.init_sft_epochs
        return 0.0 if self.model.name_or_path else 1.0

    @property
    def start_l2s(self) -> tuple[float, ...]:  # em.init_l2 as it applies to em.init_features
        if self.em.init_l2 is not None:
            return tuple(self.em.init_l2)
        wide = self.em.init_features in ("language", "reference_by_prompt_state")
        return ((1.0, 0.1) if wide else ()) + (1e-2, 1e-3, 1e-4)

    @property
    def generation_tokens(self) -> int:
        """Length cap of MMRA's (and so eval's) samples: mmra.max_new_tokens, else
        data.max_response_tokens."""
        return self.mmra.max_new_tokens or self.data.max_response_tokens


def _parse_scalar(text: str):
    # YAML gives the natural types: 3 -> int, 0.1 -> float, true -> bool, null -> None.
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = _parse_scalar(value)


def _format_errors(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    origin = path or "config"
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    for a in overrides or []:
        apply_override(tree, a)
    if overrides:
        origin = f"{origin} (with --set)"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
