"""The eval table for people (report/tables.py): the comparison with the single policy."""

from rich.console import Console

from emdpo_ray.report.tables import evaluation


def _render(ev: dict) -> str:
    console = Console(record=True, width=200)
    for t in evaluation(ev):
        console.print(t)
    return " ".join(console.export_text().split())   # captions wrap


def test_eval_table_shows_own_minus_single_dpo_and_what_own_best_means():
    gen = {"policies": ["type_0", "type_1", "single_dpo", "reference"],
           "own_policy": ["type_0", "type_1"], "prompts": 4, "prompt_source": "heldout",
           "reward": [[2.0, 0.0, 2.5, 1.0], [0.0, 2.0, 1.0, 1.0]],
           "reward_ci": [[[1.5, 2.5]] * 4, [[1.5, 2.5]] * 4],
           "own_is_best": [True, True], "types_served": 2,
           "own_minus_single_dpo": [-0.5, 1.0],
           "own_minus_single_dpo_ci": [[-1.0, 0.1], [0.5, 1.5]],
           "own_above_single_dpo_paired": [False, True]}
    ev = {"true_shares": [0.5, 0.5], "match": [0, 1], "eta": [0.5, 0.5],
          "type_accuracy": [0.7, 0.7], "ari": 1.0, "generations": gen}
    text = _render(ev)
    assert "own - single_dpo" in text
    assert "-0.5" in text and "[-1.0, 0.1]" in text and "+1.0" in text and "[0.5, 1.5]" in text
    assert "than from every other type's policy and the reference" in text
    assert "1 of 2 more than from the single policy" in text
    # a run without the single-DPO baseline: no such column
    gen2 = {k: v for k, v in gen.items() if not k.startswith("own_minus_single")
            and k != "own_above_single_dpo_paired"}
    assert "own - single_dpo" not in _render({**ev, "generations": gen2})
    # the true-regret table says how closely L's regrets track the true ones, when known
    tr = {"uniform": {"regret": [0.5, 0.4], "max_regret": 0.5}}
    assert "Pearson" not in _render({**ev, "true_regret": tr})
    fid = {**gen, "regret_fidelity": {"pearson": 0.91, "pairs": 2}}
    assert "Pearson 0.91 over 2 (type, rival policy) pairs" in _render(
        {**ev, "true_regret": tr, "generations": fid})


def test_training_table_says_whether_each_iterations_types_were_kept():
    from emdpo_ray.report.tables import training

    history = [{"iteration": 0, "log_likelihood": -10.0, "mixing_weights": [0.5, 0.5],
                "ari": 0.9, "start": {"heldout_loglik_chosen": -0.93}},
               {"iteration": 1, "log_likelihood": -9.0, "mixing_weights": [0.5, 0.5],
                "ari": 0.9, "max_delta_gamma": 0.0,
                "guard": {"heldout_loglik_per_ranking": -1.63, "accepted": False}}]
    console = Console(record=True, width=200)
    for t in training(history, {}):
        console.print(t)
    rows = [line for line in console.export_text().splitlines() if "│" in line]
    assert "-0.93" in rows[0] and "-1.63" in rows[1] and "no: stopped" in rows[1]
