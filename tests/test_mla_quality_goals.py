"""The goal lines of benchmarks/mla_quality.py, read from a made-up JSON: the issue's verdicts come from this code,
so a ratio on the wrong side of the goal or a verdict inside the spread must show up here, not in BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def render(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: the parts import each other by name
    import _mla_render
    import _mla_rows

    return _mla_render, _mla_rows


def rows(rows_module, kind: str, method: str, ppls: list[float], kls: list[float], settings: dict, lever: str):
    """Healing rows as ``_mla_heal.healing_row`` writes them, one per seed."""
    out = []
    for seed, (ppl, kl) in enumerate(zip(ppls, kls, strict=True)):
        row = {"kind": kind, "method": method, "seed": seed, "ppl": ppl, "trainable": 1000,
               "lora_r": None if method == "clover" else 4, "train_kl": kl, "heldout_kl": kl, "seconds": 1.0,
               "settings": settings, "run": 0, "balanced": True}
        out.append(row if kind == "control" or lever == rows_module.HEAL_LEVER else {**row, "lever": lever})
    return out


def payload(rows_module, clover: list[float], lora: list[float], control: list[float], clover_kl: list[float],
            lora_kl: list[float]) -> dict:
    settings = dict(rows_module.HEAL, steps=480)
    lever = rows_module.HEAL_LEVER
    heal = (rows(rows_module, "healed", "clover", clover, clover_kl, settings, lever)
            + rows(rows_module, "healed", "lora", lora, lora_kl, settings, lever)
            + rows(rows_module, "control", "clover", control, [0.01] * len(control), settings, lever))
    return {"base_ppl": 30.0, "rows": [{"name": lever, "kept": rows_module.HEAL_KEPT, "ppl": 60.0}], "heal": heal}


def test_healed_goal_reads_the_best_method_against_its_own_control(render):
    module, rows_module = render
    met = module.heal_goals(payload(rows_module, [32.0, 32.2, 31.8], [34.0, 34.1, 33.9], [30.0, 30.1, 29.9],
                                    [0.30, 0.31, 0.29], [0.32, 0.33, 0.31]))
    goal = next(line for line in met if "of the identically tuned base" in line)
    assert goal.endswith("1.067x (clover, 3 seeds, control 3) -> MET")
    missed = module.heal_goals(payload(rows_module, [36.0, 36.2, 35.8], [37.0, 37.1, 36.9], [30.0, 30.1, 29.9],
                                       [0.30, 0.31, 0.29], [0.32, 0.33, 0.31]))
    goal = next(line for line in missed if "of the identically tuned base" in line)
    assert goal.endswith("1.200x (clover, 3 seeds, control 3) -> NOT MET")


def test_clover_against_lora_is_a_verdict_only_beyond_two_standard_errors(render):
    module, rows_module = render
    ahead = module.heal_goals(payload(rows_module, [32.0, 32.2, 31.8], [34.0, 34.1, 33.9], [30.0, 30.1, 29.9],
                                      [0.30, 0.31, 0.29], [0.32, 0.33, 0.31]))
    line = next(line for line in ahead if line.startswith("CLOVER healing") and "vs lora" in line)
    assert "difference 2.00" in line and "-> ahead beyond the spread: yes" in line
    assert line.endswith("CLOVER ahead")  # the late held-out KL: 0.30 vs 0.32, sd 0.01 a side
    level = module.heal_goals(payload(rows_module, [33.0, 35.0, 31.0], [34.0, 34.1, 33.9], [30.0, 30.1, 29.9],
                                      [0.30, 0.31, 0.29], [0.30, 0.31, 0.29]))
    line = next(line for line in level if line.startswith("CLOVER healing") and "vs lora" in line)
    assert "-> ahead beyond the spread: NO (not separated)" in line and line.endswith("CLOVER not separated")


def test_separation_needs_more_than_two_standard_errors(render):
    module, _ = render
    assert module.separation(2.01, 1.0) == "ahead"
    assert module.separation(-2.01, 1.0) == "behind"
    assert module.separation(2.0, 1.0) == "not separated"


def test_healing_length_lines_up_one_method_and_conversion_across_steps(render):
    module, rows_module = render
    lever = rows_module.HEAL_LEVER
    short, long = dict(rows_module.HEAL, steps=120), dict(rows_module.HEAL, steps=480)
    heal = (rows(rows_module, "healed", "clover", [40.0, 41.0], [0.4, 0.4], short, lever)
            + rows(rows_module, "healed", "clover", [36.0], [0.3], long, lever)
            + rows(rows_module, "control", "clover", [30.0], [0.01], long, lever)
            + rows(rows_module, "healed", "lora", [37.0], [0.3], long, lever))  # one length only: no line
    lines = module.length_findings({"base_ppl": 30.0, "rows": [], "heal": heal})
    assert len(lines) == 1 and lines[0].startswith("clover")
    windows = 120 * rows_module.HEAL["batch_size"]
    assert f"120 steps ({windows} windows): 40.50 (2); 480 steps" in lines[0]
    assert lines[0].endswith("36.00 (1), control 30.00 (1), gap 6.00 = 1.200x")


def test_healing_length_projects_the_goal_only_from_two_controlled_lengths(render):
    module, _ = render

    def run(mean):
        return {"mean": mean, "sd": 0.0, "n": 1}

    # gap 10 -> 6 over two doublings: x0.775 a doubling; the 1.10x goal's gap of 3 is 2.71 doublings on: 6.6x
    text = module.projection([(120, run(40.0), run(30.0)), (480, run(36.0), run(30.0))])
    assert "x0.775 per doubling of steps from 120 to 480" in text and "about 7x 480 steps" in text
    assert module.projection([(480, run(36.0), run(30.0))]) == ""
    assert module.projection([(120, run(36.0), run(30.0)), (480, run(40.0), run(30.0))]) == ""  # gap grew
    assert module.projection([(120, run(34.0), run(30.0)), (480, run(32.0), run(30.0))]) == ""  # goal met


def test_a_stream_refit_row_is_read_against_its_parent_and_counts_as_training_free(render):
    """The stream refit is closed form: its row may meet the training-free goal, its line reads it against the row
    its name extends (an O and MLP refit row also against the MLP refit alone), and the per-layer split block
    leaves it out (its splits are its parent's)."""
    module, rows_module = render
    parent = rows_module.fastest(32) + ", per-layer split"
    fits = [[0.10, 0.08, True, 0.1], [0.20, 0.21, False, 1.0], [0.30, 0.20, True, 0.1]]
    split = {"split": 4.0, "split_losses": {"4": 0.8, "layer": 0.7}, "layer_splits": [4.0, 1.0, 16.0]}
    payload = {"base_ppl": 30.0, "heal": [], "rows": [
        {"name": parent, "kept": 0.25, "ppl": 50.0, "seconds": 100.0, **split},
        {"name": parent + rows_module.MLP, "kept": 0.25, "ppl": 47.0, "seconds": 130.0,
         "stream_fits": {"down": fits}, **split},
        {"name": parent + rows_module.LOCAL, "kept": 0.25, "ppl": 40.0, "seconds": 900.0}]}
    (line,) = module.stream_findings(payload)
    assert line.startswith(f"{parent} at KV 25.0%, MLP refit: test ppl 50.00 -> 47.00 (-6.0%, 1.567x base); ")
    assert "down_proj kept in 2 of 3 layers (ridge chosen: 0.1 in 2), held-out stream error (median) 0.2000 -> " \
        "0.2000" in line and line.endswith("conversion 100 s -> 130 s")
    payload["rows"][1]["run"] = 1  # the parent has no run: timed apart, and the line says so
    assert module.stream_findings(payload)[0].endswith("conversion 100 s -> 130 s (timed in different runs)")
    assert module.refit_findings(payload)[0].startswith(f"{parent} at KV 25.0%: test ppl 50.00 -> 40.00")
    payload["rows"].append({"name": parent + rows_module.LOCAL + rows_module.MLP, "kept": 0.25, "ppl": 38.0,
                            "seconds": 950.0, "stream_fits": {"down": fits}})  # its parent: the refit row
    assert len(module.refit_findings(payload)) == 1
    assert module.stream_findings(payload)[1].startswith(f"{parent + rows_module.LOCAL} at KV 25.0%, MLP refit: "
                                                         "test ppl 40.00 -> 38.00")
    payload["rows"].append({"name": parent + rows_module.STREAM, "kept": 0.25, "ppl": 45.0, "seconds": 160.0,
                            "stream_fits": {"o": fits[::-1], "down": fits}, **split})
    both = module.stream_findings(payload)[2]
    assert both.startswith(f"{parent} at KV 25.0%, O and MLP refit: test ppl 50.00 -> 45.00 (-10.0%, 1.500x base; "
                           "the MLP refit alone 47.00); o_proj kept in 2 of 3 layers")
    assert both.index("o_proj") < both.index("down_proj")
    assert [line.split(" at KV")[0] for line in module.split_findings(payload)] == [parent]
    goal = next(g for g in module.goals_of(payload) if g.startswith("engine-ready KV 25%"))
    assert goal == f"engine-ready KV 25% <= 1.6x base ppl training-free: 1.500x ({parent + rows_module.STREAM}) -> MET"
