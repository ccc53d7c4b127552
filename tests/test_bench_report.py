"""firm.bench_stats and firm.bench_report on hand-made bench folders: method labels per layout, paired
statistics with the class as the unit, convergence races, scorer robustness, the best test checkpoint,
old folders without loss_mode / budget, the budget ladder."""
import json
import math

import pytest

from scipy.stats import binomtest

from firm.bench_report import write_report
from firm.bench_stats import method_labels, speedup_log_ratios, target_epochs
from firm.stats import race
from firm.serialization import read_json, write_json


def run_result(cls, loss, seed, epochs, values, mode=None, budget=None, dataset="toy", extra_final=(), new=False):
    """One run file's content: a learning curve (cos1, no ensemble) and its final records.
    ``new``: as the current bench writes it (class as a string, preset by name)."""
    base = dict(dataset=dataset, normal_class=str(cls) if new else cls, loss=loss, seed=seed, split="test")
    tags = {k: v for k, v in (("loss_mode", mode), ("budget", budget)) if v is not None}
    recs = [dict(base, eval_set="test", scorer="cos1", tta="none", epoch=e, final=False, auroc=v, **tags)
            for e, v in zip(epochs, values)]
    recs.append({**recs[-1], "final": True})
    recs += [{**recs[-1], "scorer": s, "auroc": a} for s, a in extra_final]
    name = f"{dataset}-c{cls}-{loss}{'-' + mode if mode else ''}-s{seed}{f'-b{budget}' if budget else ''}"
    preset = "cpu" if new else {"epochs": epochs[-1]}
    return name, {"run": name, **base, **tags, "total_seconds": 60.0, "preset": preset, "records": recs}


def write_runs(folder, results):
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for name, result in results:
        write_json(folder / "runs" / f"{name}.json", result)


def curve(final, reach_at, epochs=(0, 2, 4, 6, 8)):
    """A curve from 0.5 that first reaches ``final`` at epoch ``reach_at`` (an evaluation
    epoch) and stays there."""
    return list(epochs), [0.5 if e == 0 else (final if e >= reach_at else final - 0.01 * (reach_at - e)) for e in epochs]


# FIRM (concat) and FIRM (pairwise) differ by +-1 point around each other; NT-Xent is 6 points
# below FIRM/concat in every cell and reaches its final only at epoch 8; FIRM/concat is exactly
# at NT-Xent's final at epoch 2 (and at its own final from epoch 4).
FIRM = {(0, 0): 0.80, (0, 1): 0.82, (1, 0): 0.70, (1, 1): 0.66}
PAIRWISE = {(0, 0): 0.81, (0, 1): 0.81, (1, 0): 0.71, (1, 1): 0.65}


@pytest.fixture
def layouts(tmp_path):
    results = []
    for (cls, seed), v in FIRM.items():
        results.append(run_result(cls, "firm", seed, [0, 2, 4, 6, 8], [0.5, v - 0.06, v, v, v], mode="concat",
                                  extra_final=[("kde", v + 0.01)]))
        results.append(run_result(cls, "firm", seed, *curve(PAIRWISE[cls, seed], 4), mode="pairwise"))
        for mode in ("concat", "pairwise"):
            results.append(run_result(cls, "ntxent", seed, *curve(v - 0.06, 8), mode=mode))
    write_runs(tmp_path, results)
    return tmp_path


def test_layouts_are_reported_apart_with_paired_statistics(layouts):
    text = write_report(layouts, "firm bench --dataset toy").read_text()
    assert "| normal class | firm/concat | firm/pairwise | ntxent/concat | ntxent/pairwise |" in text
    # per class mean +- std over the two seeds: class 0 FIRM/concat = 0.81 +- sqrt(2) * 0.01
    assert f"| 0 | 0.8100 ± {math.sqrt(2) * 0.01:.4f} |" in text
    assert "| **mean** | **0.7450** | **0.7450** | **0.6850** | **0.6850** |" in text
    # FIRM/concat - FIRM/pairwise: -0.01, +0.01 within each class -> class means 0 and 0, two classes:
    # no interval, the class values instead, and no test (every class is a tie)
    assert "| firm/concat | firm/pairwise | 2 (4) | +0.00 | none (2 classes) | none (2 classes) | +0.00, +0.00 |" in text
    assert "too few classes (2) for an interval" in text
    # FIRM/concat gains 6 points in every cell over either NT-Xent layout; the exact two-sided
    # Wilcoxon p of 2 positive class means is 2 / 2**2
    row = "| firm/concat | ntxent/concat | 2 (4) | +6.00 | none (2 classes) | none (2 classes) | +6.00, +6.00 | 0.5† |"
    assert row in text and "† Too few classes" in text and "| 2 / 0 / 0 |" in text
    # FIRM/pairwise: (0.81-0.74, 0.81-0.76, 0.71-0.64, 0.65-0.60) = (7, 5, 7, 5) points -> +6
    assert "| firm/pairwise | ntxent/concat | 2 (4) | +6.00 |" in text
    # firm/pairwise vs firm/concat is the same comparison as above, given once
    assert "| firm/pairwise | firm/concat |" not in text
    # race to NT-Xent's final: NT-Xent needs 8 epochs in every cell, FIRM/concat 2 -> FIRM first in all
    # 4 cells and both classes; speed-up 4x, over two classes the values only
    assert "| firm/concat | ntxent/concat | 4 (2) | 0 | 4 / 0 / 0 (0 censored); classes 2 / 0 / 0, p 0.5† | " \
           "4.00x (values 4.00x, 4.00x) over 4 cells |" in text
    assert "95 % CI" not in text
    assert "Models are never chosen by test labels" in text
    assert "Methods: firm/concat, firm/pairwise, ntxent/concat, ntxent/pairwise (" in text
    assert not (layouts / "ladder.png").exists()

    results = read_json(layouts / "results.json")
    assert len(results["records"]) == sum(len(json.loads(f.read_text())["records"])
                                          for f in (layouts / "runs").glob("*.json"))
    assert results["methods"] == ["firm/concat", "firm/pairwise", "ntxent/concat", "ntxent/pairwise"]
    assert results["ladder"] is None
    auroc = {(c["method"], c["other"]): c for c in results["comparisons"] if c["metric"] == "auroc"}
    assert set(auroc) == {("firm/concat", "firm/pairwise"), ("firm/concat", "ntxent/concat"),
                          ("firm/concat", "ntxent/pairwise"), ("firm/pairwise", "ntxent/concat"),
                          ("firm/pairwise", "ntxent/pairwise")}
    same = auroc["firm/concat", "firm/pairwise"]
    assert same["covers_zero"] is None and same["p_value"] is None and (same["wins"], same["ties"]) == (0, 2)
    assert same["verdict"] == "too few classes (2) for an interval" and "class values +0.00, +0.00" in same["text"]
    cls0 = [r for r in results["per_class"] if r["method"] == "firm/concat" and r["normal_class"] == 0]
    assert cls0[0]["mean"] == pytest.approx(0.81) and cls0[0]["std"] == pytest.approx(math.sqrt(2) * 0.01)


def test_one_layout_per_loss_keeps_plain_names():
    records = [{"loss": "firm", "loss_mode": "concat"}, {"loss": "ntxent", "loss_mode": "pairwise"},
               {"loss": "ntxent", "loss_mode": "pairwise"}, {"loss": "supcon"}]
    assert method_labels(records) == {("firm", "concat"): "firm", ("ntxent", "pairwise"): "ntxent",
                                      ("supcon", None): "supcon"}
    mixed = method_labels(records + [{"loss": "firm"}])
    assert mixed[("firm", "concat")] == "firm/concat" and mixed[("firm", None)] == "firm/unrecorded"


def test_convergence_cells_by_hand():
    epochs = [0, 2, 4, 6, 8]
    other = {(0, 0): (epochs, [0.5, 0.6, 0.7, 0.75, 0.8]), (1, 0): (epochs, [0.5, 0.52, 0.55, 0.58, 0.6]),
             (2, 0): (epochs, [0.5, 0.9, 0.9, 0.9, 0.9]), (3, 0): (epochs, [0.5, 0.47, 0.49, 0.5, 0.5])}
    firm = {(0, 0): (epochs, [0.5, 0.8, 0.9, 0.9, 0.9]), (1, 0): (epochs, [0.5, 0.7, 0.7, 0.7, 0.7]),
            (2, 0): (epochs, [0.5, 0.6, 0.7, 0.8, 0.85]), (3, 0): (epochs, [0.5, 0.6, 0.7, 0.8, 0.85])}
    finals = {k: v[1][-1] for k, v in other.items()}
    firm_e, other_e, undefined = target_epochs(firm, other, finals)
    # class 3: the other method ends where its untrained encoder started: undefined, dropped
    assert undefined == 1 and (3, 0) not in firm_e
    # class 0: 2 against 8; class 1: FIRM crosses 0.6 half way to epoch 2; class 2: FIRM never gets there
    assert firm_e == {(0, 0): 2.0, (1, 0): 1.0, (2, 0): math.inf} and other_e == {(0, 0): 8.0, (1, 0): 8.0, (2, 0): 2.0}
    # the censored cell is in the race, for the other method, and not in the speed-up
    logs = speedup_log_ratios(firm_e, other_e)
    assert logs == pytest.approx({(0, 0): math.log(4), (1, 0): math.log(8)})
    outcome = race(firm_e, other_e)
    assert (outcome.first, outcome.second, outcome.censored) == (2, 1, 1)
    assert outcome.p_value == pytest.approx(binomtest(2, 3, 0.5).pvalue)


def test_old_folder_without_layout_or_budget(tmp_path):
    # the hand-made bench of tests/test_bench.py: class 0 NT-Xent 0.8 reached at epoch 8, FIRM 0.9
    # (reaches 0.8 at epoch 2); class 1 NT-Xent 0.6 at epoch 8, FIRM 0.7 (reaches 0.6 at epoch 1)
    e = [0, 2, 4, 6, 8]
    write_runs(tmp_path, [run_result(0, "ntxent", 0, e, [0.5, 0.6, 0.7, 0.75, 0.8]),
                          run_result(0, "firm", 0, e, [0.5, 0.8, 0.9, 0.9, 0.9]),
                          run_result(1, "ntxent", 0, e, [0.5, 0.52, 0.55, 0.58, 0.6]),
                          run_result(1, "firm", 0, e, [0.5, 0.7, 0.7, 0.7, 0.7])])
    text = write_report(tmp_path).read_text()
    assert "| normal class | firm | ntxent |" in text and "**0.8000**" in text and "**0.7000**" in text
    assert "Methods: firm, ntxent (" in text
    assert "| firm | ntxent | 2 (2) | +10.00 | none (2 classes) |" in text
    # geometric mean of the speed-ups 8/2 and 8/1
    assert f"| {math.sqrt(32):.2f}x (values 4.00x, 8.00x) over 2 cells |" in text
    assert "Per class: one seed" in text and "budget" not in text.split("## toy")[1].split("\n")[0]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # standard JSON (one seed: the per-class std is null, not NaN), old records kept with null tags
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert {r["std"] for r in results["per_class"]} == {None}
    assert len(results["records"]) == 4 * 6 and {r["budget"] for r in results["records"]} == {None}


def test_a_loss_run_in_one_layout_keeps_its_plain_name(tmp_path):
    e = [0, 2, 4, 6, 8]
    write_runs(tmp_path, [run_result(c, "firm", 0, e, [0.5, 0.7, 0.8, 0.8, v], mode=mode, budget=8, new=True)
                          for c, v in ((10, 0.8), (2, 0.7)) for mode in ("concat", "pairwise")]
               + [run_result(c, "ntxent", 0, e, [0.5, 0.6, 0.65, 0.7, v], mode="pairwise", budget=8, new=True)
                  for c, v in ((10, 0.75), (2, 0.6))])
    text = write_report(tmp_path).read_text()
    assert "Methods: firm/concat, firm/pairwise, ntxent (layout pairwise) (" in text
    assert "Preset: `cpu`" in text and "budget" not in text.split("## toy")[1].split("\n")[0]
    assert text.index("| 2 | 0.7000 |") < text.index("| 10 | 0.8000 |")  # classes "2", "10" in numeric order
    # (0.8 - 0.75, 0.7 - 0.6) -> +7.50 points
    assert "| firm/concat | ntxent | 2 (2) | +7.50 |" in text and "| firm/pairwise | ntxent | 2 (2) | +7.50 |" in text


def test_incomplete_grid_is_flagged(tmp_path):
    e = [0, 2, 4, 6, 8]
    write_runs(tmp_path, [run_result(0, "ntxent", 0, e, [0.5, 0.6, 0.7, 0.75, 0.8]),
                          run_result(0, "firm", 0, e, [0.5, 0.8, 0.9, 0.9, 0.9]),
                          run_result(1, "ntxent", 0, e, [0.5, 0.52, 0.55, 0.58, 0.6]),
                          run_result(0, "ntxent", 1, e, [0.5, 0.6, 0.7, 0.75, 0.78])])
    text = write_report(tmp_path).read_text()
    assert "Incomplete grid: firm lacks 1 of 2 classes" in text
    assert "**0.9000** (1 of 2 classes)" in text
    # the gain pairs class 0 seed 0 only: 0.9 - 0.8
    assert "| firm | ntxent | 1 (1) | +10.00 | none (1 class) |" in text


def test_budget_ladder(tmp_path):
    results = []
    for budget, epochs, gain in ((4, [0, 1, 2, 3, 4], 0.02), (8, [0, 2, 4, 6, 8], 0.05)):
        for (cls, seed), v in FIRM.items():
            bump = 0.01 * seed  # seeds differ, so the interval has width
            results.append(run_result(cls, "firm", seed, *curve(v, epochs[1], epochs), budget=budget, new=True))
            results.append(run_result(cls, "ntxent", seed, *curve(v - gain - bump, epochs[-1], epochs), budget=budget,
                                      new=True))
            results.append(run_result(cls, "rotsupcon", seed, *curve(v + 0.01 - bump, epochs[-1], epochs),
                                      budget=budget, new=True))
    write_runs(tmp_path, results)
    text = write_report(tmp_path).read_text()
    assert "## Budget ladder" in text and "Preset: `cpu`" in text
    assert "## toy, test set, budget 4 epochs: final AUROC" in text and "## toy, test set, budget 8 epochs" in text
    # gains over NT-Xent: budget 4: 2 points + 0 / 1 point by seed -> +2.50 in both classes; budget 8: +5.50
    assert "| toy (test) | 4 | firm | ntxent | 2 (4) | +2.50 (values +2.50, +2.50) |" in text
    assert "| toy (test) | 8 | firm | ntxent | 2 (4) | +5.50 (values +5.50, +5.50) |" in text
    # the paper's claims beside them
    assert "| cifar10 (paper) | 2,000 | firm | ntxent | 10 x 5 seeds | +6.2 | - | (as reported) | - | - | about 12x |" \
        in text
    assert "| cifar10 (paper) | 2,000 | firm | rotsupcon |" in text and "7x faster than Rot-SupCon" in text
    png = tmp_path / "ladder.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    ladder = read_json(tmp_path / "results.json")["ladder"]
    assert ladder["budgets"] == [4, 8] and ladder["paper"]["speedup"]["ntxent"] == 12.0
    rows = {(r["budget"], r["other"]): r for r in ladder["rows"]}
    assert set(rows) == {(4, "ntxent"), (4, "rotsupcon"), (8, "ntxent"), (8, "rotsupcon")}
    assert rows[8, "ntxent"]["auroc_gain"]["mean"] == pytest.approx(0.055)
    # the gap over NT-Xent grew by 3 points in every cell from budget 4 to 8; over Rot-SupCon it stayed
    grew, same = rows[8, "ntxent"]["gain_change"], rows[8, "rotsupcon"]["gain_change"]
    assert grew["from_budget"] == 4 and grew["mean"] == pytest.approx(0.03) and (grew["wins"], grew["losses"]) == (2, 0)
    assert same["mean"] == pytest.approx(0.0, abs=1e-9) and same["ties"] == 2
    assert rows[4, "ntxent"]["gain_change"] is None
    assert "2 / 0 / 0 (from 4) |" in text
    # speed-up over NT-Xent at budget 8: NT-Xent reaches its final at 8, FIRM passes it at 2 or
    # earlier (FIRM is above it from epoch 2 on) -> at least 4x
    assert math.exp(rows[8, "ntxent"]["speed"]["log_speedup"]["mean"]) >= 4 - 1e-9
    # Rot-SupCon ends 1 point above FIRM on seed 0, level on seed 1: FIRM never reaches its final
    # on the two seed-0 cells (censored, Rot-SupCon first) and is first on the seed-1 cells
    race = rows[8, "rotsupcon"]["speed"]["race"]
    assert (race["censored"], race["first"], race["second"], race["classes_level"]) == (2, 2, 2, 2)


def test_machine_line_gives_total_mean_and_range_of_run_times(tmp_path):
    e = [0, 2, 4, 6, 8]
    runs = [run_result(c, "firm", 0, e, [0.5, 0.6, 0.7, 0.75, 0.8]) for c in range(4)]
    for (_, result), seconds in zip(runs, (60.0, 120.0, 180.0, None)):
        result["total_seconds"] = seconds
    write_runs(tmp_path, runs)
    # 6 min in all over the 3 timed runs: 0.10 h, 2.0 min per run, from 1 to 3 min
    assert "Runs: 4, total wall time 0.10 h (2.0 min per run, 1.0-3.0, 3 of the runs timed)." in \
        write_report(tmp_path).read_text()


def test_change_in_gain_pairs_only_cells_that_ran_both_methods_at_both_budgets(tmp_path):
    results = []
    for budget, epochs, gains in ((4, [0, 2, 4], {0: 0.01, 1: 0.03}), (8, [0, 4, 8], {0: 0.02, 2: 0.09})):
        for cls, gain in gains.items():
            results.append(run_result(cls, "firm", 0, *curve(0.8, epochs[1], epochs), budget=budget, new=True))
            results.append(run_result(cls, "ntxent", 0, *curve(0.8 - gain, epochs[-1], epochs), budget=budget,
                                      new=True))
    write_runs(tmp_path, results)
    write_report(tmp_path)
    change = read_json(tmp_path / "results.json")["ladder"]["rows"][-1]["gain_change"]
    # only class 0 ran at both budgets: its gain went from 1 to 2 points
    assert change["n_pairs"] == 1 and change["mean"] == pytest.approx(0.01)


def test_budget_ladder_shows_only_the_paper_claims_for_losses_that_ran(tmp_path):
    results = []
    for budget, epochs in ((4, [0, 2, 4]), (8, [0, 4, 8])):
        for (cls, seed), v in FIRM.items():
            results.append(run_result(cls, "firm", seed, *curve(v, epochs[1], epochs), budget=budget, new=True))
            results.append(run_result(cls, "ntxent", seed, *curve(v - 0.02, epochs[-1], epochs), budget=budget,
                                      new=True))
    write_runs(tmp_path, results)
    text = write_report(tmp_path).read_text()
    assert "| cifar10 (paper) | 2,000 | firm | ntxent |" in text
    assert "| cifar10 (paper) | 2,000 | firm | rotsupcon |" not in text
    paper = read_json(tmp_path / "results.json")["ladder"]["paper"]  # what ladder.png draws as stars
    assert paper["gain_points"] == {"ntxent": 6.2} and set(paper["speedup"]) == {"ntxent"}


def test_robustness_table_and_best_test_checkpoint(tmp_path):
    # five classes, one seed: FIRM ends 2 points above NT-Xent under cos1 in every class and 1 point
    # below it under kde; FIRM's curve peaks at epoch 4, 3 points above its last epoch
    e = [0, 2, 4, 6, 8]
    results = []
    for c in range(5):
        v = 0.6 + 0.05 * c
        results.append(run_result(c, "firm", 0, e, [0.5, v, v + 0.03, v + 0.01, v], extra_final=[("kde", v - 0.01)]))
        results.append(run_result(c, "ntxent", 0, e, [0.5, v - 0.04, v - 0.03, v - 0.02, v - 0.02],
                                  extra_final=[("kde", v)]))
    write_runs(tmp_path, results)
    text = write_report(tmp_path).read_text()
    results = read_json(tmp_path / "results.json")
    robust = {r["scorer"]: r for r in results["robustness"]}
    assert robust["cos1"]["mean"] == pytest.approx(0.02) and robust["kde"]["mean"] == pytest.approx(-0.01)
    assert robust["kde"]["verdict"] == "below zero"
    assert "| kde | none | **-1.00 [-1.00, -1.00]** |" in text
    assert "firm vs ntxent: ahead under 1, behind under 1 of 2" in text
    # the authors' selection: the best test cos1 AUROC of each curve (cos5/angled is not recorded)
    selection = {r["method"]: r for r in results["selection"]}
    assert selection["firm"]["best_test"] - selection["firm"]["last"] == pytest.approx(0.03)
    assert selection["ntxent"]["best_test"] == pytest.approx(selection["ntxent"]["last"])
    assert selection["firm"]["selected_by"] == ["cos1/none"]
    best = next(c for c in results["comparisons"] if c["metric"] == "best_test")
    assert best["mean"] == pytest.approx(0.05)
    # the race to NT-Xent's best test AUROC (v - 0.02, first at epoch 6): FIRM passes it before epoch 2 in every run
    race = next(c for c in results["comparisons"] if c["metric"] == "speed_best_test")["race"]
    assert (race["first"], race["second"], race["classes_first"]) == (5, 0, 5)
    assert "best test checkpoint (the authors' selection; optimistic)" in text


def test_best_test_checkpoint_never_feeds_the_returned_model():
    from firm.bench_stats import best_checkpoint
    from firm.config import apply_overrides, preset
    from firm.runner import run
    settings = apply_overrides(preset("cpu"), {
        "dataset": "digits", "normal_class": "3", "width": 4, "head_hidden": 16, "head_layers": 1, "epochs": 3,
        "batch_size": 16, "train_images": 24, "device": "cpu", "eval_every": 1, "scorers": ["cos1"],
        "final_tta": ["none"], "curve_scorers": ["cos1", "cos5"], "curve_tta": ["none", "angled"]})
    outcome = run(settings, progress=False, log=lambda _: None)
    curve = [r for r in outcome.records if not r["final"]]
    # the authors' curve: every curve scorer under every curve ensemble, before training and after each epoch
    assert {(r["scorer"], r["tta"], r["epoch"]) for r in curve} == {
        (s, m, e) for s in ("cos1", "cos5") for m in ("none", "angled") for e in range(4)}
    # the final figure is the last epoch's model, whatever epoch the test labels would have chosen
    final = next(r for r in outcome.records if r["final"] and (r["scorer"], r["tta"]) == ("cos1", "none"))
    last = next(r for r in curve if (r["scorer"], r["tta"], r["epoch"]) == ("cos1", "none", 3))
    assert final["auroc"] == pytest.approx(last["auroc"], abs=1e-9) and final["epoch"] == 3
    records = [{**r, "method": r["loss"]} for r in outcome.records]
    best = best_checkpoint(records)
    ((auroc, selected_by),) = best.values()
    assert selected_by == "cos5/angled"
    assert auroc in {r["auroc"] for r in curve if (r["scorer"], r["tta"]) == ("cos1", "none") and r["epoch"] > 0}


def test_best_test_checkpoint_chooses_among_every_nth_epoch_only():
    from firm.bench_stats import best_checkpoint
    curve = {0: 0.50, 3: 0.90, 10: 0.70, 20: 0.80, 30: 0.75}  # the best evaluation (epoch 3) is off the stride
    records = [{"dataset": "d", "eval_set": "test", "normal_class": "0", "loss": "firm", "seed": 0, "final": False,
                "scorer": "cos1", "tta": "none", "epoch": e, "auroc": v} for e, v in curve.items()]
    assert best_checkpoint(records)[("d", "test", 0, "firm", 0)] == (0.90, "cos1/none")
    assert best_checkpoint(records, every=10)[("d", "test", 0, "firm", 0)] == (0.80, "cos1/none")
    assert best_checkpoint(records, every=40) == {}
