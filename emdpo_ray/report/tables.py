"""Compact tables of a run for people (`train`, `mmra`, `eval` on a terminal); the JSON stays
in the run directory and on stdout for scripts (`--format json`)."""

from __future__ import annotations

from rich.table import Table


def _f(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _vec(xs, nd: int = 2) -> str:
    return "[" + ", ".join(_f(x, nd) for x in xs) + "]"


def training(history: list[dict], summary: dict) -> list[Table]:
    t = Table(title="EM-DPO, one row per iteration (0: the start)", title_justify="left",
              caption_justify="left",
              caption=("ARI: agreement of the MAP types with the true ones (1 = exact, 0 = "
                       "chance). held-out: log-likelihood per held-out ranking of the model "
                       "behind the types (a random order of 3 responses scores -1.79); an "
                       "iteration's new types are kept only if its policies predict those "
                       "rankings better than that model, beyond noise (the gain paired per "
                       "user, em.guard_level)"))
    for c in ("iter", "log-lik", "eta (type shares)", "ARI", "max|dgamma|", "held-out",
              "new types kept", "M-step s"):
        t.add_column(c, justify="right")
    for h in history:
        guard, start = h.get("guard"), h.get("start") or {}
        held = guard["heldout_loglik_per_ranking"] if guard else start.get("heldout_loglik_chosen")
        kept = "-" if not guard else ("yes" if guard.get("accepted") else "no: stopped")
        t.add_row(str(h["iteration"]), _f(h.get("log_likelihood"), 1),
                  _vec(h["mixing_weights"]), _f(h.get("ari")), _f(h.get("max_delta_gamma")),
                  _f(held, 2), kept, _f((h.get("timings") or {}).get("fit_wall_s"), 0))
    out = [t]
    if summary.get("mmra"):
        out.append(mmra(summary["mmra"]))
    return out


def types(rep: dict) -> Table:
    """`emdpo-ray types`: one row per K."""
    has_ari = "ari" in rep["rows"][0]
    t = Table(title=f"How many types? {rep['features']}: K = {rep['chosen_types']}",
              title_justify="left", caption=(
                  f"held-out: log-likelihood per held-out ranking ({rep['heldout_rankings']} "
                  "held out of "
                  f"{rep['rankings']}, from {rep['users']} users), each user's type read from "
                  "their other rankings; gain: over K - 1, with its 95% interval (users "
                  "resampled). K grows while the gain's interval is above 1e-3 (beyond rounding). "
                  "Features that "
                  "cannot see a difference between users find one type there."))
    for c in ("K", "held-out [95%]", "gain over K-1 [95%]", "L2", "type shares") + (
            ("ARI",) if has_ari else ()):
        t.add_column(c, justify="right")
    for r in rep["rows"]:
        gain = ("-" if r["gain_interval"] is None else
                f"{r['gain_per_ranking']:+.3f} [{r['gain_interval'][0]:+.3f}, "
                f"{r['gain_interval'][1]:+.3f}]")
        t.add_row(("* " if r["types"] == rep["chosen_types"] else "") + str(r["types"]),
                  f"{r['heldout_loglik_per_ranking']:.3f} [{r['heldout_interval'][0]:.3f}, "
                  f"{r['heldout_interval'][1]:.3f}]", gain, f"{r['l2']:g}", _vec(r["shares"]),
                  *((_f(r["ari"], 2),) if has_ari else ()))
    return t


def mmra(mm: dict) -> Table:
    k = len(mm["weights"])
    boot = mm.get("bootstrap") or {}
    t = Table(title=(f"MMRA on {mm.get('num_prompts')} {mm.get('prompt_source', '')} prompts: "
                     "L[i][j] = type i's reward (log-ratio) of policy j's samples; regret = "
                     "what type i loses against its own policy"), title_justify="left")
    t.add_column("type i")
    for j in range(k):
        t.add_column(f"L[i][{j}]", justify="right")
    t.add_column("MMRA weight", justify="right")
    t.add_column("regret under MMRA", justify="right")
    for i in range(k):
        t.add_row(str(i), *[_f(x, 2) for x in mm["L"][i]],
                  _f(mm["weights"][i]) + (f" {_vec(boot['weights_ci'][i])}" if boot else ""),
                  _f(mm["regret"][i]))
    base = "  ".join(f"{name}={_f(v['max_regret'])}" for name, v in mm["baselines"].items())
    ci = f" {_vec(boot['max_regret_ci'], 3)}" if boot else ""
    t.caption = f"max regret: MMRA={_f(mm['max_regret'])}{ci}  {base}"
    return t


def evaluation(ev: dict) -> list[Table]:
    out = []
    t = Table(title="Type recovery", title_justify="left")
    for c in ("true type", "learned type", "share", "eta", "accuracy on its users' pairs"):
        t.add_column(c, justify="right")
    for i, share in enumerate(ev.get("true_shares", [])):
        t.add_row(str(i), str(ev["match"][i]), _f(share, 2), _f(ev["eta"][i], 2),
                  _f(ev["type_accuracy"][i]))
    t.caption = f"ARI = {_f(ev.get('ari'))} (1 = types recovered exactly, 0 = chance)"
    out.append(t)
    gen = ev.get("generations")
    if gen:
        names = gen["policies"]
        g = Table(title=(f"Mean true reward of each policy's generations ({gen['prompts']} "
                         f"{gen.get('prompt_source') or ''} prompts, 95% intervals; * = own policy)"),
                  title_justify="left")
        g.add_column("true type")
        for n in names:
            g.add_column(n, justify="right")
        g.add_column("own best?", justify="center")
        vs_single = gen.get("own_minus_single_dpo")
        if vs_single:
            g.add_column("own - single_dpo", justify="right")
        for i, row in enumerate(gen["reward"]):
            cells = []
            for j, x in enumerate(row):
                lo, hi = gen["reward_ci"][i][j]
                star = "*" if names[j] == gen["own_policy"][i] else ""
                cells.append(f"{star}{x:.1f}\n[{lo:.1f}, {hi:.1f}]")
            cells.append("yes" if gen["own_is_best"][i] else "no")
            if vs_single:
                d, ci = vs_single[i], gen["own_minus_single_dpo_ci"][i]
                cells.append("-" if d is None else f"{d:+.1f}\n[{ci[0]:.1f}, {ci[1]:.1f}]")
            g.add_row(str(i), *cells)
        n = len(gen["reward"])
        g.caption = (f"own best: {gen['types_served']} of {n} types get more reward from their "
                     "own policy than from every other type's policy and the reference")
        if vs_single:
            above = sum(d is not None and d > 0 for d in vs_single)
            g.caption += (f"; {above} of {n} more than from the single policy trained on "
                          f"everyone ({sum(gen['own_above_single_dpo_paired'])} with the "
                          "paired interval above 0)")
        out.append(g)
    if ev.get("true_regret"):
        r = Table(title=("True regret per type, in its true reward, against its own policy "
                         "(MMRA minimises the largest regret in L, which approximates it)"),
                  title_justify="left")
        r.add_column("serving")
        n = len(next(iter(ev["true_regret"].values()))["regret"])
        for i in range(n):
            r.add_column(f"true type {i}", justify="right")
        r.add_column("max [95% interval]", justify="right")
        r.add_column("max - uniform's (paired)", justify="right")
        for name, v in ev["true_regret"].items():
            lo_hi = v.get("max_regret_ci")
            vs = v.get("max_regret_minus_uniform_ci")
            r.add_row(name, *[_f(x, 2) for x in v["regret"]],
                      _f(v["max_regret"], 2) + (f" {_vec(lo_hi)}" if lo_hi else ""),
                      _vec(vs) if vs else "-")
        fid = (ev.get("generations") or {}).get("regret_fidelity")
        if fid:
            r.caption = (f"L's regrets against these true ones: Pearson {fid['pearson']:.2f} "
                         f"over {fid['pairs']} (type, rival policy) pairs")
        out.append(r)
    return out
