"""Tests of study.py: stages are skipped when done and resumed from a checkpoint, a failing
stage stops the study with a one-line error naming its log, and the aggregation over seeds
(mean and spread, token efficiency) on hand-made evaluation outputs."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import study  # noqa: E402
import utils  # noqa: E402


def _stage(tmp_path, name="s", code="", resume_from=""):
    done = tmp_path / f"{name}.done"
    script = f"import sys; open({str(done)!r}, 'w').write(' '.join(sys.argv[1:]))\n" + code
    return study.Stage(name, [sys.executable, "-c", script], str(done), resume_from), done


def test_stage_runs_once_then_is_skipped(tmp_path):
    st, done = _stage(tmp_path)
    assert study.run_stage(st, str(tmp_path / "logs")) > 0 and done.exists()
    done.write_text("kept")
    assert study.run_stage(st, str(tmp_path / "logs")) == 0.0  # skipped: the output stands
    assert done.read_text() == "kept"
    assert "$ " in (tmp_path / "logs" / "s.log").read_text()  # the command is logged


def test_stage_with_a_checkpoint_resumes(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    st, done = _stage(tmp_path, resume_from=str(ckpt))
    study.run_stage(st, str(tmp_path / "logs"))
    assert done.read_text() == ""  # no checkpoint: a fresh start
    done.unlink()
    ckpt.write_text("x")
    study.run_stage(st, str(tmp_path / "logs"))
    assert done.read_text() == "--resume"


def test_failing_stage_is_one_error_naming_its_log(tmp_path):
    st = study.Stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path / "never"))
    with pytest.raises(utils.UserError, match=r"stage bad failed \(exit 3\); see .*bad\.log: .*boom"):
        study.run_stage(st, str(tmp_path / "logs"))
    st = study.Stage("silent", [sys.executable, "-c", "pass"], str(tmp_path / "never"))
    with pytest.raises(utils.UserError, match="ended without writing"):
        study.run_stage(st, str(tmp_path / "logs"))


def _curve(tokens_per_trace, maj, passes=None):
    k = list(range(1, len(maj) + 1))
    return {"k": k, "tokens": [tokens_per_trace * i for i in k], "pass": passes or maj, "maj": maj,
            "context_tokens": [0.0] * len(k), "pass_se": [0.0] * len(k), "maj_se": [0.0] * len(k), "problems": 4}


def _write_eval(seed_dir, runs):
    report = {"settings": {"problems": 4, "samples": 4, "window": 128, "temperature": 1.0},
              "runs": {name: {"format": "backtrack", "modes": {"parallel": c}} for name, c in runs.items()}}
    os.makedirs(os.path.join(seed_dir, "eval"), exist_ok=True)
    json.dump(report, open(os.path.join(seed_dir, "eval", "curves.json"), "w"))


def test_aggregate_mean_spread_and_token_saving(tmp_path):
    out = tmp_path / "study"
    # seed 0: MRT reaches the outcome baseline's peak (0.6 at 400 tokens) at 200 tokens: saving +50%
    _write_eval(out / "seed0", {"grpo-mrt": _curve(100, [0.4, 0.6, 0.6, 0.7]),
                                "grpo-outcome": _curve(100, [0.3, 0.4, 0.5, 0.6])})
    # seed 1: MRT needs 300 of the baseline's 400 tokens: saving +25%
    _write_eval(out / "seed1", {"grpo-mrt": _curve(100, [0.2, 0.4, 0.6, 0.6]),
                                "grpo-outcome": _curve(100, [0.3, 0.4, 0.5, 0.6])})
    for s, (a, b) in enumerate([(0.2, 0.5), (0.3, 0.4)]):
        os.makedirs(out / f"seed{s}" / "grpo" / "mrt")
        json.dump({"start": a, "end": b}, open(out / f"seed{s}" / "grpo" / "mrt" / "eval.json", "w"))
    md = tmp_path / "RESULTS.md"
    text = study.aggregate(str(out), [0, 1], str(md), str(tmp_path / "fig"))
    assert md.read_text() == text
    # 100 tokens: maj 0.4 and 0.2 -> 30.0 ± 14.1 (sample sd over seeds)
    row = next(line for line in text.splitlines() if line.startswith("| grpo-mrt |") and " / " in line)
    assert "30.0 ± 14.1 / 30.0 ± 14.1" in row
    # pass@1 (0.4, 0.2), pass@4 = maj@4 (0.7, 0.6), 100 tokens per trace
    assert "| grpo-mrt | 30.0 ± 14.1 | 65.0 ± 7.1 | 65.0 ± 7.1 | 100 ± 0 |" in text
    eff = next(line for line in text.splitlines() if line.startswith("| grpo-mrt | grpo-outcome |"))
    assert "+38% ± 18%" in eff  # mean of +50% and +25%, sd 17.7
    assert "| grpo-mrt | 25.0 ± 7.1 | 45.0 ± 7.1 |" in text  # held-out accuracy start -> end
    assert (tmp_path / "fig" / "fig7_parallel.png").stat().st_size > 1000


def test_fmt_marks_missing_seeds():
    assert study.fmt([0.5]) == "50.0"
    assert study.fmt([0.5, None]) == "50.0 (1/2 seeds)"  # one value has no spread
    assert study.fmt([0.5, 0.3, None]) == "40.0 ± 14.1 (2/3 seeds)"
    assert study.fmt([0.25, 0.35], sign=True, digits=0, unit="%") == "+30% ± 7%"
    assert study.fmt([None, None]) == "-"


def test_later_stages_use_only_the_models_that_exist(tmp_path):
    """A STaR run that kept nothing writes no model: evaluate and infogain leave it out (their
    commands are built when they run), and RESULTS.md says why it has no row."""
    seed_dir = tmp_path / "seed0"
    for run in ("warmstart/backtrack", "grpo/mrt", "star/star"):
        os.makedirs(seed_dir / run / "model")
        (seed_dir / run / "model" / "config.json").write_text("{}")
    plan = {st.name: st for st in study.stages(str(seed_dir), 0, study.SIZES["quick"], "base")}
    cmd = " ".join(plan["evaluate"].cmd())
    assert f"grpo-mrt={seed_dir}/grpo/mrt/model" in cmd and "star-star=" in cmd and "base=base" in cmd
    assert "star-mrt=" not in cmd and "grpo-outcome=" not in cmd
    ig = " ".join(plan["infogain"].cmd())
    assert "grpo-mrt=" in ig and "star-star=" not in ig and "base=" not in ig  # backtrack models only
    os.makedirs(seed_dir / "star" / "mrt" / "model")
    (seed_dir / "star" / "mrt" / "model" / "config.json").write_text("{}")
    assert "star-mrt=" in " ".join(plan["evaluate"].cmd())  # read again when the stage runs

    it = {"kept_fraction": 0.0}
    for m, model_dir in (("mrt", None), ("star", "x")):
        os.makedirs(seed_dir / "star" / m, exist_ok=True)
        json.dump({"iterations": [it, it], "accuracy": [0.1, 0.1, 0.1], "model_dir": model_dir},
                  open(seed_dir / "star" / m / "summary.json", "w"))
    text = study.aggregate(str(tmp_path), [0], str(tmp_path / "RESULTS.md"), str(tmp_path / "fig"))
    row = next(x for x in text.splitlines() if x.startswith("| star-mrt |"))
    assert "kept nothing in 1/1 seeds" in row
    assert "kept nothing" not in next(x for x in text.splitlines() if x.startswith("| star-star |"))


def test_stage_env_threads_and_eager():
    quick = study.stage_env(study.Args(quick=True, jobs=1), {"PATH": "/bin"})
    assert quick["MRT_VLLM_EAGER"] == "1" and "OMP_NUM_THREADS" not in quick
    full = study.stage_env(study.Args(jobs=2), {"MRT_VLLM_EAGER": "1"})
    assert full["MRT_VLLM_EAGER"] == "1" and int(full["OMP_NUM_THREADS"]) >= 1  # the user's setting stays
    assert study.stage_env(study.Args(quick=True, eager="off"), {})["MRT_VLLM_EAGER"] == "0"
    assert study.stage_env(study.Args(eager="on", jobs=2), {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    with pytest.raises(utils.UserError, match="--eager"):
        study.main(study.Args(eager="sometimes", aggregate_only=True))


def test_stage_threads_follow_the_cpu_affinity():
    """--jobs stages share the cores this process may use (taskset, a cgroup's cpuset), not the
    machine's count."""
    cores = os.sched_getaffinity(0)
    assert int(study.stage_env(study.Args(jobs=2), {})["OMP_NUM_THREADS"]) == max(1, len(cores) // 2)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert utils.usable_cores() == 1
        assert study.stage_env(study.Args(jobs=2), {})["OMP_NUM_THREADS"] == "1"
    finally:
        os.sched_setaffinity(0, cores)


def _timed_stage(tmp_path, name, after=(), sleep=0.3, fail=False):
    """A stage that records when it started and ended (for the scheduler tests)."""
    done, stamp = tmp_path / f"{name}.done", tmp_path / f"{name}.times"
    code = (f"import sys, time; t0 = time.time(); time.sleep({sleep}); "
            f"open({str(stamp)!r}, 'w').write(f'{{t0}} {{time.time()}}'); "
            + ("sys.exit(4)" if fail else f"open({str(done)!r}, 'w').write('ok')"))
    return study.Stage(name, [sys.executable, "-c", code], str(done), after=tuple(after))


def _span(tmp_path, name):
    return [float(x) for x in (tmp_path / f"{name}.times").read_text().split()]


def test_run_stages_respects_after_and_runs_side_by_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    plans = {0: [_timed_stage(a, "first"), _timed_stage(a, "second", after=["first"]), _timed_stage(a, "free"),
                 _timed_stage(a, "last", after=["second", "free", "not-planned"])],
             1: [_timed_stage(b, "first")]}
    times = study.run_stages(plans, {0: str(a / "logs"), 1: str(b / "logs")}, jobs=2)
    assert set(times[0]) == {"first", "second", "free", "last"} and set(times[1]) == {"first"}
    assert _span(a, "second")[0] >= _span(a, "first")[1]  # after its input
    assert _span(a, "last")[0] >= max(_span(a, "second")[1], _span(a, "free")[1])
    starts = sorted([_span(a, n)[0] for n in ("first", "free")] + [_span(b, "first")[0]])
    assert starts[1] < min(_span(a, "first")[1], _span(b, "first")[1])  # two stages ran at once
    spans = [_span(a, n) for n in ("first", "second", "free", "last")] + [_span(b, "first")]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2  # never more than --jobs
    assert json.loads((a / "logs" / "times.jsonl").read_text())["seconds"].keys() == times[0].keys()


def test_run_stages_failure_stops_dependents_and_raises(tmp_path):
    plans = {0: [_timed_stage(tmp_path, "bad", fail=True), _timed_stage(tmp_path, "needs-bad", after=["bad"]),
                 _timed_stage(tmp_path, "free", sleep=0.6)]}
    with pytest.raises(utils.UserError, match="stage bad failed"):
        study.run_stages(plans, {0: str(tmp_path / "logs")}, jobs=2)
    assert not (tmp_path / "needs-bad.times").exists()  # never started
    assert (tmp_path / "free.done").exists()  # already running: it finished
    assert json.loads((tmp_path / "logs" / "times.jsonl").read_text())["seconds"] == {"free": pytest.approx(0.6, abs=5)}


def test_study_stage_inputs():
    plan = {st.name: st for st in study.stages("s", 0, study.SIZES["quick"], "base")}
    assert plan["grpo-mrt"].after == ("warmstart",) and plan["warmstart-rise"].after == ("warmstart",)
    assert plan["star-mrt"].after == () and plan["r1-base"].after == () and plan["r1-grpo-mrt"].after == ("grpo-mrt",)
    assert set(plan["evaluate"].after) == {n for n in plan if n.startswith(("warmstart", "star-", "grpo-"))}


@pytest.mark.parametrize("preset", sorted(study.SIZES))
def test_every_stage_command_parses(preset, tmp_path):
    """Each stage's command line of both presets is accepted by its script's own parser (a
    renamed flag left in SIZES would fail the study only when that stage runs). Commands
    built at run time from earlier stages' outputs (callables) are built from stand-in models."""
    import importlib

    seed_dir = tmp_path / "seed0"
    for name, path in study.model_paths(str(seed_dir), "base").items():  # every stage's model, as if written
        if name != "base":
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "config.json"), "w").write("{}")
    (seed_dir / "truth" / "forced").mkdir(parents=True)
    (seed_dir / "truth" / "forced" / "traces_base.jsonl").write_text("{}\n")
    for st in study.stages(str(seed_dir), 0, study.SIZES[preset], "base"):
        if callable(st.cmd):  # reads which models and traces the stages before it produced
            cmd = st.cmd()
        else:
            cmd = st.cmd
        script = os.path.basename(cmd[1])
        module = importlib.import_module(script[:-3])
        try:
            utils.parse_args(module.Args, cmd[2:])
        except SystemExit:
            pytest.fail(f"{preset} {st.name}: {script} rejects {' '.join(cmd[2:])}")


def test_restart_step_counts():
    """Counts per restart step of grpo.py's logged continuations (text after "...MARKER\\nStep")."""
    z0 = "Step 1: 2 + 3 = 6\nStep 2: 6 * 2 = 12\nThe answer is \\boxed{12}"
    texts = [" 1: 2 + 3 = 5\nStep 2: 5 * 2 = 10\nThe answer is \\boxed{10}", " 2: 6 * 2 = 12\nThe answer is \\boxed{12}",
             " 1: 2 + 3 = 5", " 7: x\nThe answer is \\boxed{1}", " one: 2 + 3 = 5\n", " 1: 2 + 3 = 5\nStep 2: 5 * 2 = 10"]
    rows = [{"step": 1, "z0": z0, "completions": [{"text": t} for t in texts]}]
    assert study.restart_step_counts(rows) == {"1": 2, "2": 1, "3": 0, "4": 0, "5+": 1, "none": 2}


def test_tables_report_both_filter_readings_and_the_unparsed_share(tmp_path):
    """The STaR table gives the keep rate of each reading of MRT's filter (gain > 0, Alg. 1;
    gain >= 0, Fig. 4) per iteration; the RL table the share of continuations that do not parse
    into episodes, in the first and the last quarter of the steps."""
    seed = tmp_path / "seed0"
    os.makedirs(seed / "star" / "mrt")
    its = [{"kept_fraction": 0.25, "kept_fraction_gain_pos": 0.25, "kept_fraction_gain_nonneg": 0.5},
           {"kept_fraction": 0.5, "kept_fraction_gain_pos": 0.5, "kept_fraction_gain_nonneg": 0.75}]
    json.dump({"iterations": its, "accuracy": [0.1, 0.2, 0.3], "model_dir": "x"},
              open(seed / "star" / "mrt" / "summary.json", "w"))
    os.makedirs(seed / "grpo" / "mrt")
    json.dump({"start": 0.2, "end": 0.4}, open(seed / "grpo" / "mrt" / "eval.json", "w"))
    with open(seed / "grpo" / "mrt" / "metrics.jsonl", "w") as f:
        for i, u in enumerate([0.5, 0.25, 0.0, 0.125]):
            f.write(json.dumps({"step": i + 1, "accuracy": 0.5, "completion_len_mean": 40.0, "unparsed_share": u}) + "\n")
    text = study.aggregate(str(tmp_path), [0], str(tmp_path / "RESULTS.md"), str(tmp_path / "fig"))
    assert "| star-mrt | 25.0 / 50.0 | 25.0 / 50.0 | 50.0 / 75.0 | 10.0 | 30.0 | |" in text
    assert "| grpo-mrt | 20.0 | 40.0 | 50.0 / 12.5 |" in text


def test_paired_differences_by_hand():
    """study.paired: differences per seed, their mean and sd (ddof 1), and the call: a
    difference only when every seed agrees in sign and |mean| > 2 sd / sqrt(n)."""
    p = study.paired({0: 0.40, 1: 0.50, 2: 0.45}, {0: 0.30, 1: 0.35, 2: 0.40})
    assert p["diffs"] == pytest.approx({0: 0.10, 1: 0.15, 2: 0.05})
    assert p["mean"] == pytest.approx(0.10) and p["sd"] == pytest.approx(0.05) and p["n"] == 3
    assert p["clear"]  # 0.10 > 2 * 0.05 / sqrt(3) = 0.0577
    noisy = study.paired({0: 0.40, 1: 0.50, 2: 0.45}, {0: 0.45, 1: 0.35, 2: 0.40})  # -0.05, +0.15, +0.05
    assert noisy["mean"] == pytest.approx(0.05) and not noisy["clear"]  # signs disagree
    wide = study.paired({0: 0.9, 1: 0.31, 2: 0.32}, {0: 0.3, 1: 0.30, 2: 0.30})  # +0.6, +0.01, +0.02
    assert wide["mean"] == pytest.approx(0.21) and not wide["clear"]  # same sign, mean < 2 se (0.3377)
    assert study.paired({0: None, 1: 0.5}, {0: 0.2, 2: 0.1}) is None  # no seed has both
    one = study.paired({0: 0.5}, {0: 0.2})
    assert one["n"] == 1 and one["sd"] == 0.0 and not one["clear"]  # one seed is never a verdict
    assert study.paired_cell(p) == "+10.0 ± 5.0 (seeds: +10.0, +15.0, +5.0; a difference)"
    assert study.paired_cell(None) == "-"


def test_paired_section_reads_the_runs(tmp_path):
    """paired_section on hand-written run outputs of two seeds: held-out end from eval.json, the
    last quarter's restart_fixable from metrics.jsonl, differences MRT-B - outcome-only."""
    seed_dirs = {}
    for s, (mrt_end, out_end) in enumerate([(0.40, 0.30), (0.50, 0.35)]):
        d = tmp_path / f"seed{s}"
        for parts, e in ((("grpo", "mrt"), mrt_end), (("grpo", "outcome"), out_end),
                         (("truth", "grpo", "mrt-forced"), mrt_end), (("truth", "grpo", "outcome"), out_end)):
            run = d.joinpath(*parts)
            run.mkdir(parents=True)
            (run / "eval.json").write_text(json.dumps({"start": 0.2, "end": e}))
            fixable = [0.0, 0.0, 0.0, 0.5 if parts[-1] != "outcome" else 0.25]  # the last quarter: one row
            (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "restart_fixable": f}) + "\n"
                                                       for i, f in enumerate(fixable)))
        seed_dirs[s] = str(d)
    lines = study.paired_section(seed_dirs)
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| held") or
             line.startswith("| fixable")}
    assert "+12.5 ± 3.5 (seeds: +10.0, +15.0; a difference)" in table["held-out z2, RL from the warmstart (forced mu)"]
    assert "+12.5 ± 3.5" in table["held-out z2, RL from the base (forced mu)"]
    assert "+25.0 ± 0.0 (seeds: +25.0, +25.0; a difference)" in table["fixable restarts, last quarter (forced mu)"]
    assert not any("rollout" in k for k in table)  # no rollout runs written: no rows
