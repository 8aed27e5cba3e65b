"""pytest setup: Triton's interpreter on machines without a GPU, the `gpu` and `slow` marks, a
fresh seed per test. What the test files share lives in helpers.py, not here."""
import os

import torch

# Must happen before triton is first imported (nllfused imports it at its first Triton call).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import nllfused  # noqa: E402

if not nllfused.build_info()["built"]:
    # Testing a source tree that was never built would silently skip every kernel backend.
    raise RuntimeError(f"nllfused is not built ({nllfused.build_info()['error']}); install it "
                       f"first: pip install --no-build-isolation -e .")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (or set NLLFUSED_SLOW=1)")


def _run_slow(config):
    return config.getoption("--runslow") or os.environ.get("NLLFUSED_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    # Skipped, not deselected: the count of tests collected is the same either way.
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not _run_slow(config):
        skips["slow"] = pytest.mark.skip(reason="slow: run with --runslow or NLLFUSED_SLOW=1")
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)
                break


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, reproducible from the printed seed on failure:
    # NLLFUSED_TEST_SEED=<seed> replays one.
    seed = int(os.environ.get("NLLFUSED_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Put the seed in the failure report, so that NLLFUSED_TEST_SEED can replay it.
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"NLLFUSED_TEST_SEED={value}"))


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, whose environment changes reach the CPU kernels' settings: the
    extension reads NLLFUSED_CPU_* once per reload_cpu_env() (csrc/cpu/settings.h), so every
    setenv / delenv and the final undo reload them."""
    reload = getattr(nllfused._extension._C, "reload_cpu_env", lambda: None)
    for name in ("setenv", "delenv"):
        def changed(*args, _change=getattr(monkeypatch, name), **kwargs):
            _change(*args, **kwargs)
            reload()
        setattr(monkeypatch, name, changed)
    yield monkeypatch
    monkeypatch.undo()
    reload()
