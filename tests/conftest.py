"""Test setup: Triton's interpreter on machines without a GPU, the backends to test, the oracle."""
import os

import torch

# Must happen before triton is first imported (nllfused imports it).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import nllfused  # noqa: E402
from nllfused import backends  # noqa: E402

if nllfused.ops.EXTENSION_ERROR is not None:
    # Testing a source tree that was never built would silently skip every kernel backend.
    raise RuntimeError(f"nllfused is not built ({nllfused.ops.EXTENSION_ERROR}); install it "
                       f"first: pip install --no-build-isolation -e .")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params():
    """(device, backend) pairs for every backend that can run here; GPU ones carry `gpu`."""
    params = []
    for device in DEVICES:
        for backend in backends.available(torch.device(device)):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run (GUIDE §4), reproducible from the printed seed on failure.
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
