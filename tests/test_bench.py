"""The benchmark CLI (bench/, installed as nllfused.bench): it runs, writes what it says, and a
provider that disagrees with float64 torch is reported as wrong and never timed.

Timings themselves are not asserted: benchmarks are not tests.
"""
import csv
import io
import json

import pytest
import torch
import torch.nn.functional as F

from nllfused.bench import cases, cli, memory, providers, report, summary
from nllfused.bench.progress import Progress
from nllfused.bench.runner import COLUMNS

# One thread: tiny ops on a loaded 2-core machine spend their time waiting for OpenMP workers.
BASE = ["--device", "cpu", "--preset", "smoke", "--no-progress", "--threads", "1", "--no-plots"]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    rc = cli.main(BASE + ["--out", str(out), *extra])
    data = json.loads((out / "results.json").read_text())
    return rc, out, data


def _ce_provider(name, scale=1.0, fail=False):
    def build():
        def loss(logits, target):
            if fail:
                raise RuntimeError("kernel exploded")
            return F.cross_entropy(logits, target, ignore_index=cases.IGNORE_INDEX) * scale
        return loss
    return providers.Provider(name, "test provider", ce=build)


def test_smoke_run_writes_csv_and_json(tmp_path, capsys):
    rc, out, data = _run(tmp_path, "--providers", "torch")
    assert rc == 0
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS + ["device", "torch", "triton", "git_commit", "date"]
    smoke = cases.build_cases(["smoke"], torch.device("cpu"))
    assert len(rows) == sum(len(c.modes) for c in smoke)
    assert {r["status"] for r in rows} == {"ok"}
    assert all(float(r["time_ms"]) > 0 and int(r["peak_mem_bytes"]) >= 0 for r in rows)
    ce_rows = [r for r in rows if r["kind"] == "ce"]
    assert all(float(r["gbps"]) > 0 and float(r["pct_of_copy"]) > 0 for r in ce_rows)
    assert all(float(r["tflops"]) > 0 for r in rows if r["kind"] == "linear")
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in rows)
    meta = data["meta"]
    for key in ("device", "torch", "triton", "git_commit", "date", "copy_gbps",
                "timing_method", "memory_method"):
        assert key in meta
    assert meta["copy_gbps"] > 0
    # the pages the tensors had (on a VM 4 KiB pages can slow a stream markedly)
    assert meta["pages"].startswith(("4 KiB", "2 MiB")) and "THP_MEM_ALLOC_ENABLE=" in meta["pages"]
    printed = capsys.readouterr().out
    assert "N256·C1000" in printed and "fwd_bwd" in printed and "copy bandwidth" in printed
    assert f"pages: {meta['pages']}" in printed
    table = summary.text(data)
    assert "N256·C1000" in table and "torch" in table
    assert summary.markdown(data).count("| N256·C1000 | fp32 |") == 2  # fwd and fwd_bwd


def test_wrong_provider_is_reported_and_not_timed(tmp_path, monkeypatch):
    monkeypatch.setitem(providers.REGISTRY, "off-by-1pct", _ce_provider("off-by-1pct", 1.01))
    rc, out, data = _run(tmp_path, "--providers", "torch,off-by-1pct")
    assert rc == 0  # not an nllfused provider
    rows = [r for r in data["results"] if r["kind"] == "ce"]
    wrong = [r for r in rows if r["provider"] == "off-by-1pct"]
    assert wrong and all(r["status"] == "wrong" for r in wrong)
    assert all(r["time_ms"] is None and r["peak_mem_bytes"] is None for r in wrong)
    assert all(r["loss_err"] > r["tolerance"] for r in wrong)
    assert all(r["status"] == "ok" and r["time_ms"] for r in rows if r["provider"] == "torch")
    # It has no linear implementation: not applicable there, not an error.
    assert {r["status"] for r in data["results"]
            if r["provider"] == "off-by-1pct" and r["kind"] == "linear"} == {"n/a"}


def _strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON (RFC 8259): jq, JavaScript
    and most other readers reject a file holding them."""
    def refuse(name):
        raise ValueError(f"{name} in results.json")
    return json.loads(text, parse_constant=refuse)


def test_nan_provider_is_wrong_and_its_json_stays_json(tmp_path, monkeypatch):
    """A provider whose loss is NaN has a NaN error: the row is `wrong`, and results.json
    writes the error as null, not as the NaN token."""
    monkeypatch.setitem(providers.REGISTRY, "nan-loss", _ce_provider("nan-loss", float("nan")))
    _, out, data = _run(tmp_path, "--providers", "torch,nan-loss", "--mode", "fwd")
    rows = [r for r in _strict_json((out / "results.json").read_text())["results"]
            if r["provider"] == "nan-loss" and r["kind"] == "ce"]
    assert rows and all(r["status"] == "wrong" and r["loss_err"] is None for r in rows)


def test_failing_nllfused_provider_sets_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(providers.REGISTRY, "nllfused-broken",
                        _ce_provider("nllfused-broken", fail=True))
    rc, _, data = _run(tmp_path, "--providers", "torch,nllfused-broken", "--mode", "fwd")
    assert rc == cli.EXIT_PROVIDER_FAILED
    broken = [r for r in data["results"] if r["provider"] == "nllfused-broken"
              and r["kind"] == "ce"]
    assert broken and all(r["status"] == "error" and "kernel exploded" in r["note"]
                          for r in broken)
    assert {r["mode"] for r in data["results"]} == {"fwd"}
    assert "kernel exploded" in capsys.readouterr().out


@pytest.mark.parametrize("mode, torch_env, pages", [
    ("always", None, "2 MiB"), ("madvise", "1", "2 MiB"), ("madvise", None, "4 KiB"),
    ("never", "1", "4 KiB")])
def test_cpu_pages_follow_thp_mode_and_torch_setting(monkeypatch, mode, torch_env, pages):
    modes = " ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never"))
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path).endswith("transparent_hugepage/enabled"):
            return io.StringIO(modes + "\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    if torch_env is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", torch_env)
    from nllfused.bench import environment
    got = environment.cpu_pages()
    assert got.startswith(pages) and f"THP {mode}" in got


def test_provider_selection_notes_and_exclusions():
    cpu = torch.device("cpu")
    chosen, notes = providers.select(cpu, None, {"ce"}, ["quick"])
    names = [p.name for p in chosen]
    assert names[0] == "torch" and "nllfused-torch" in names
    # Never the Triton interpreter, no CUDA-only provider, no torch.compile in quick on a CPU.
    assert not {"nllfused-triton", "nllfused-cuda", "liger", "quack", "torch-compile"} & set(names)
    assert any(n.startswith("torch-compile: left out") for n in notes)
    assert any(n.startswith("nllfused-triton: skipped") for n in notes)
    chosen, _ = providers.select(cpu, ["torch-compile"], {"ce"}, ["quick"])
    assert [p.name for p in chosen] == ["torch-compile"]
    with pytest.raises(ValueError, match="unknown provider"):
        providers.select(cpu, ["nope"], {"ce"}, ["quick"])


def test_presets():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    llm = cases.build_cases(["llm"], gpu)
    assert len(llm) == 20 and {c.short_dtype for c in llm} == {"bf16", "fp32"}
    assert llm[0].dtype == torch.bfloat16  # bf16 first: a time budget drops fp32 first
    assert {c.shape for c in cases.build_cases(["linear"], gpu)} == {
        (8192, 4096, 128256), (8192, 2304, 256000)}
    assert [(c.shape, c.short_dtype) for c in cases.build_cases(["linear"], cpu)] == [
        ((2048, 1024, 32000), "bf16"), ((2048, 1024, 32000), "fp32")]
    assert [(c.shape, c.short_dtype) for c in cases.build_cases(["linear-large"], cpu)] == [
        ((4096, 2048, 128256), "bf16"), ((4096, 2048, 128256), "fp32")]
    assert "linear-large" not in cases.expand_presets(["full"], cpu)  # minutes: asked for by name
    small_heads = cases.build_cases(["linear-small"], cpu)
    assert {c.shape for c in small_heads} == {(64, 128, 10), (256, 1024, 1024), (512, 512, 2048),
                                              (1024, 256, 4096), (2048, 512, 8192)}
    assert {c.short_dtype for c in small_heads} == {"bf16", "fp32"}
    cpu_preset = cases.build_cases(["cpu"], cpu)
    assert {(c.shape, c.short_dtype) for c in cpu_preset} == {
        (s, d) for s in [(4096, 32000), (2048, 50257), (1024, 128256)] for d in ("fp32", "bf16")}
    assert cases.expand_presets(["full"], gpu) == ["llm", "vision", "linear"]
    only_bf16 = cases.build_cases(["quick"], cpu, cases.parse_dtypes("bfloat16"), ["fwd"])
    assert {c.dtype for c in only_bf16} == {torch.bfloat16}
    assert {c.modes for c in only_bf16} == {("fwd",)}
    assert cases.default_preset(cpu) == "quick" and cases.default_preset(gpu) == "llm"
    case = cases.Case("x", "ce", (16, 21, 512, 512), torch.bfloat16)
    assert case.floor_bytes("fwd") == 16 * 21 * 512 * 512 * 2
    assert case.floor_bytes("fwd_bwd") == 3 * case.floor_bytes("fwd")


def test_baseline_gives_a_second_paired_speedup(tmp_path, monkeypatch, capsys):
    """--baseline PROVIDER: every provider but torch also gets its speed against that one (on
    the CPU timed in pairs with it), the baseline itself 1.0; torch's rows keep only theirs."""
    monkeypatch.setitem(providers.REGISTRY, "plain", _ce_provider("plain"))
    monkeypatch.setitem(providers.REGISTRY, "extra", _ce_provider("extra"))
    rc, _, data = _run(tmp_path, "--providers", "torch,extra,plain", "--baseline", "plain",
                       "--mode", "fwd")
    assert rc == 0 and data["meta"]["baseline"] == "plain"
    rows = [r for r in data["results"] if r["kind"] == "ce"]
    assert [r["provider"] for r in rows[:3]] == ["torch", "plain", "extra"]  # baseline second
    by = {p: [r for r in rows if r["provider"] == p] for p in ("torch", "plain", "extra")}
    assert all(r["speedup_vs_baseline"] is None for r in by["torch"])
    assert all(r["speedup_vs_baseline"] == 1.0 for r in by["plain"])
    assert all(r["speedup_vs_baseline"] > 0 and r["speedup_vs_torch"] > 0 for r in by["extra"])
    assert "vs plain" in capsys.readouterr().out
    assert cli.main(BASE + ["--out", str(tmp_path), "--providers", "torch",
                            "--baseline", "plain"]) == 2
    # without --baseline a run need not include torch
    assert cli.main(BASE + ["--out", str(tmp_path), "--providers", "plain", "--mode", "fwd"]) == 0


def test_bad_arguments_exit_2(tmp_path):
    assert cli.main(BASE + ["--out", str(tmp_path), "--preset", "nope"]) == 2
    assert cli.main(BASE + ["--out", str(tmp_path), "--dtype", "int8"]) == 2
    assert cli.main(BASE + ["--out", str(tmp_path), "--mode", "bwd"]) == 2
    for empty in ("", "fwd,", " , "):  # an empty name is an error, not the preset's modes
        assert cli.main(BASE + ["--out", str(tmp_path), "--mode", empty]) == 2
    assert cli.main(BASE + ["--out", str(tmp_path), "--preset", ""]) == 2
    assert cli.main(BASE + ["--out", str(tmp_path), "--providers", "torch,"]) == 2


@pytest.mark.parametrize("option", [["--threads", "0"], ["--threads", "-1"],
                                    ["--threads", "100000"], ["--time-budget", "0"],
                                    ["--time-budget", "-1"], ["--time-budget", "nan"]])
def test_bad_numbers_are_argument_errors(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        cli.main(BASE + ["--out", str(tmp_path), *option])
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli.Runner, "run", lambda self, *a: ran.append(1) or [])
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "d" / "results.csv").mkdir(parents=True)
    for out in (afile, afile / "sub", tmp_path / "d"):
        assert cli.main(BASE + ["--out", str(out), "--providers", "torch"]) == 2
        assert f"--out {str(out)!r}" in capsys.readouterr().err
    assert not ran


def test_a_mode_given_twice_is_timed_once(tmp_path):
    rc, _, data = _run(tmp_path, "--providers", "torch", "--mode", "fwd,fwd")
    assert rc == 0
    smoke = [c for c in cases.build_cases(["smoke"], torch.device("cpu"))]
    assert len(data["results"]) == len(smoke)
    assert all(r["speedup_vs_torch"] == 1.0 for r in data["results"])  # torch against itself


def test_a_case_of_two_presets_is_named_with_its_preset():
    row = dict(kind="ce", dtype="fp32", mode="fwd", provider="torch", status="ok", time_ms=1.0,
               gbps=1.0, pct_of_copy=1.0, peak_mem_bytes=0, speedup_vs_torch=1.0,
               loss_err=0.0, grad_err=0.0, note="")
    rows = [dict(row, preset="smoke", case="N8·C10"), dict(row, preset="small", case="N8·C10"),
            dict(row, preset="small", case="N4·C10")]
    labels = report.case_labels(rows)
    assert labels == {("smoke", "N8·C10"): "N8·C10 (smoke)",
                      ("small", "N8·C10"): "N8·C10 (small)", ("small", "N4·C10"): "N4·C10"}
    printed = report.table(rows)
    assert "N8·C10 (smoke)" in printed and "N8·C10 (small)" in printed
    meta = dict(device="cpu", torch="x", triton=None, git_commit="c", date="d", copy_gbps=1.0)
    assert "N8·C10 (small)" in summary.text({"meta": meta, "results": rows})


def test_summary_of_a_bad_file_is_an_argument_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    for path in (tmp_path / "missing.json", bad, other):
        with pytest.raises(SystemExit) as exit_:
            summary.main([str(path)])
        assert exit_.value.code == 2 and str(path) in capsys.readouterr().err


def test_inputs_are_reproducible_with_ignored_targets():
    case = cases.Case("x", "ce", (512, 50), torch.float32)
    a = cases.make_inputs(case, torch.device("cpu"))
    b = cases.make_inputs(case, torch.device("cpu"))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.target, b.target)
    ignored = (a.target == cases.IGNORE_INDEX).float().mean().item()
    assert 0.03 < ignored < 0.2


def test_soft_cases_run_with_probability_targets(tmp_path, monkeypatch):
    """Preset `soft`: class-probability targets of the logits' shape and dtype (reproducible,
    rows summing to 1), checked against float64 torch with 'mean' over the rows, so that a
    provider dividing by anything else is `wrong`; providers of index targets only are `n/a`;
    the floor counts the targets' bytes (read once more in each pass)."""
    soft = cases.build_cases(["soft"], torch.device("cpu"))
    assert soft and all(c.soft and c.kind == "ce" and c.name.endswith("·soft") for c in soft)
    case = cases.Case("x", "ce", (6, 5, 3, 2), torch.bfloat16, soft=True)
    a = cases.make_inputs(case, torch.device("cpu"))
    b = cases.make_inputs(case, torch.device("cpu"))
    assert torch.equal(a.target, b.target) and a.target.shape == a.logits.shape
    assert a.target.dtype == torch.bfloat16
    torch.testing.assert_close(a.target.float().sum(1), torch.ones(6, 3, 2), rtol=0, atol=2e-2)
    assert case.floor_bytes("fwd") == 2 * 6 * 5 * 3 * 2 * 2
    assert case.floor_bytes("fwd_bwd") == 5 * 6 * 5 * 3 * 2 * 2

    def summed():  # the 'sum' where 'mean' is meant: 36 times too large here
        return lambda logits, target: F.cross_entropy(logits, target, reduction="sum")

    monkeypatch.setitem(providers.REGISTRY, "summed", providers.Provider("summed", "t", summed))
    monkeypatch.setattr(cases, "_preset_table", lambda device: {
        "smoke": [("ce-soft", [(36, 7), (3, 5, 4, 3)], (torch.float32,), ("fwd",))]})
    rc, _, data = _run(tmp_path, "--providers", "torch,nllfused-cpu,nllfused-stats,summed")
    status = {(r["provider"], r["case"]): r["status"] for r in data["results"]}
    for name in ("N36·C7·soft", "3x5x4x3·soft"):
        assert status[("torch", name)] == "ok" and status[("nllfused-cpu", name)] == "ok"
        assert status[("nllfused-stats", name)] == "n/a"
        assert status[("summed", name)] == "wrong"
    assert rc == 0


def test_layout_cases_store_the_logits_as_named(tmp_path, monkeypatch):
    """Preset `layouts`: channels-last logits (classes adjacent) and the (B, V, T) view of
    (B, T, V) logits, reproducible, named by their layout; every provider gets the same strided
    tensor and is checked against float64 torch on it, so that one reading the storage as if
    it were contiguous is `wrong`."""
    layouts = cases.build_cases(["layouts"], torch.device("cpu"))
    assert {c.layout for c in layouts} == {"channels_last", "transposed"}
    assert all(c.name.endswith("·cl" if c.layout == "channels_last" else "·T") for c in layouts)
    cl = cases.Case("x", "ce", (2, 5, 4, 3), torch.bfloat16, layout="channels_last")
    tr = cases.Case("x", "ce", (2, 7, 6), torch.float32, layout="transposed")
    for case in (cl, tr):
        a, b = cases.make_inputs(case, torch.device("cpu")), cases.make_inputs(
            case, torch.device("cpu"))
        assert torch.equal(a.logits, b.logits) and a.logits.shape == case.shape
        assert a.logits.stride(1) == 1 and a.logits.is_leaf and a.logits.requires_grad
    assert cases.make_inputs(cl, torch.device("cpu")).logits.is_contiguous(
        memory_format=torch.channels_last)
    assert cases.make_inputs(tr, torch.device("cpu")).logits.stride() == (42, 1, 7)
    assert cl.seed() != cases.Case("x", "ce", (2, 5, 4, 3), torch.bfloat16).seed()

    def storage_order():  # reads the logits' storage as a contiguous tensor of their shape
        return lambda logits, target: F.cross_entropy(
            logits.as_strided(logits.shape, torch.empty(logits.shape).stride()), target)

    monkeypatch.setitem(providers.REGISTRY, "storage", providers.Provider(
        "storage", "t", storage_order))
    monkeypatch.setattr(cases, "_preset_table", lambda device: {
        "smoke": [("ce-channels_last", [(3, 5, 4, 6)], (torch.float32,), ("fwd",)),
                  ("ce-transposed", [(2, 9, 7)], (torch.float32,), ("fwd",))]})
    rc, _, data = _run(tmp_path, "--providers", "torch,nllfused-cpu,nllfused-torch,storage")
    status = {(r["provider"], r["case"]): r["status"] for r in data["results"]}
    for name in ("3x5x4x6·cl", "2x9x7·T"):
        for ok in ("torch", "nllfused-cpu", "nllfused-torch"):
            assert status[(ok, name)] == "ok", (ok, name)
        assert status[("storage", name)] == "wrong", name
    assert rc == 0


def test_extras_cases_pass_their_options_to_every_provider(tmp_path, monkeypatch):
    """Preset `extras`: nllfused's z_loss / logit_scale / softcap, named in the case, given to
    every provider as keyword arguments and checked against float64 torch with them, so that a
    provider ignoring them is `wrong`; a provider that takes no such option is `n/a`."""
    extras = cases.build_cases(["extras"], torch.device("cpu"))
    assert {k for c in extras for k, _ in c.options} == {"z_loss", "logit_scale", "softcap"}
    assert {c.name for c in extras} >= {"N64·C10·softcap30", "N256·C1000·z0.0001",
                                        "N1024·C32000·scale0.7"}
    assert len({c.seed() for c in extras}) == len({(c.shape, c.dtype, c.options) for c in extras})

    def plain():  # takes the options and computes the plain loss
        return lambda logits, target, **kw: F.cross_entropy(logits, target,
                                                            ignore_index=cases.IGNORE_INDEX)

    monkeypatch.setitem(providers.REGISTRY, "plain", providers.Provider("plain", "t", plain))
    monkeypatch.setitem(providers.REGISTRY, "bare", providers.Provider(
        "bare", "t", plain, extras=frozenset()))
    monkeypatch.setattr(cases, "_preset_table", lambda device: {
        "smoke": [("ce", [(40, 7), (3, 5, 4, 3)], (torch.float32, torch.bfloat16), ("fwd",), o)
                  for o in ((("softcap", 2.0),), (("z_loss", 0.05),), (("logit_scale", 0.3),),
                            (("z_loss", 0.05), ("logit_scale", 1.5), ("softcap", 3.0)))]})
    rc, _, data = _run(tmp_path, "--providers",
                       "torch,nllfused-cpu,nllfused-torch,nllfused-stats,plain,bare")
    status = {(r["provider"], r["case"], r["dtype"]): r["status"] for r in data["results"]}
    names = {r["case"] for r in data["results"]}
    assert len(names) == 8 and all("·" in n for n in names)
    for name in names:
        for dtype in ("fp32", "bf16"):
            for ok in ("torch", "nllfused-cpu", "nllfused-torch", "nllfused-stats"):
                assert status[(ok, name, dtype)] == "ok", (ok, name, dtype)
            assert status[("plain", name, dtype)] == "wrong", (name, dtype)
            assert status[("bare", name, dtype)] == "n/a"
    assert rc == 0


def test_cpu_peak_memory_tracks_live_bytes():
    cpu = torch.device("cpu")

    def one_then_another():
        a = torch.ones(1 << 20)  # 4 MiB, freed before the next
        del a
        b = torch.ones(1 << 19)
        return b

    def both_alive():
        return torch.ones(1 << 20), torch.ones(1 << 19)

    assert 4 << 20 <= memory.peak_bytes_above_current(one_then_another, cpu) < 5 << 20
    assert 6 << 20 <= memory.peak_bytes_above_current(both_alive, cpu) < 7 << 20


def test_progress_without_terminal_prints_lines():
    stream = io.StringIO()
    bar = Progress(2, stream=stream)
    bar.step("case a")
    bar.advance()
    bar.step("case b")
    bar.advance()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "0/2" in lines[0] and "1/2" in lines[1] and "done" in lines[2]


def test_plots_from_results(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for provider, ms in (("torch", 2.0), ("nllfused-cpu", 1.0)):
        for case_name, c in (("N8·C100", 100), ("N8·C200", 200)):
            rows.append({**dict.fromkeys(COLUMNS), "preset": "smoke", "case": case_name,
                         "kind": "ce", "shape": f"8x{c}", "dtype": "fp32", "mode": "fwd_bwd",
                         "provider": provider, "status": "ok", "time_ms": ms,
                         "gbps": 8 * c * 4 * 3 / ms / 1e6, "peak_mem_bytes": 1000 * c})
    meta = {"device": "test", "torch": torch.__version__, "git_commit": "abc",
            "date": "today", "copy_gbps": 10.0}
    paths, note = report.write_plots(str(tmp_path), rows, meta)
    assert note is None
    assert [p.split("/")[-1] for p in paths] == ["speed.png", "memory.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("speed.png", "memory.png"))
    # a later run into the folder without plots leaves none of this run's behind
    report.write_all(str(tmp_path), rows, meta, [], plots=False)
    assert not any((tmp_path / name).exists() for name in ("speed.png", "memory.png"))


def test_cpu_pairs_each_provider_with_torch(monkeypatch):
    # The two calls alternate in blocks, and each median is of its own call: a slow `ref`
    # makes the ratio, a drift shared by both leaves it alone.
    from nllfused.bench import timing
    order = []
    clock = {"t": 0.0}

    def fn():
        order.append("fn")
        clock["t"] += 0.001 * (1 + len(order) / 1000)  # drifts slower as calls go on

    def ref():
        order.append("ref")
        clock["t"] += 0.003 * (1 + len(order) / 1000)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    ms, ref_ms = timing.paired_median_ms(fn, ref, timing.CpuPolicy(1, 5, 0.0, 100), block=2)
    # blocks of one warm-up and two timed calls, until at least five are timed
    assert order == (["fn"] * 3 + ["ref"] * 3) * 3
    assert ref_ms / ms == pytest.approx(3.0, rel=0.02)


def test_providers_that_only_read_share_one_set_of_inputs(tmp_path, monkeypatch):
    # Two allocations of the same values can run ~20 % apart on a 4 KiB-page machine, so the
    # paired ratios are taken on one tensor; a provider that writes into its logits (as
    # Liger's forward does) must not corrupt it for the others, so it gets its own.
    seen = {}  # name -> the logits it was called with, kept alive: no address is reused

    def recording(name, mutates=False):
        def build():
            def loss(logits, target):
                seen.setdefault(name, []).append(logits)
                out = F.cross_entropy(logits, target, ignore_index=cases.IGNORE_INDEX)
                if mutates:
                    with torch.no_grad():
                        logits.mul_(1.0)  # a write, of the same values
                return out
            return loss
        return providers.Provider(name, "test provider", ce=build, mutates_inputs=mutates)

    for name, mutates in (("reader-a", False), ("reader-b", False), ("writer", True)):
        monkeypatch.setitem(providers.REGISTRY, name, recording(name, mutates))
    rc, _, data = _run(tmp_path, "--providers", "reader-a,reader-b,writer", "--mode", "fwd")
    assert rc == 0 and {r["status"] for r in data["results"] if r["kind"] == "ce"} == {"ok"}
    ptrs = {name: {t.data_ptr() for t in calls} for name, calls in seen.items()}
    assert ptrs["reader-a"] == ptrs["reader-b"]
    assert not ptrs["writer"] & ptrs["reader-a"]
