"""Config.compile: the same step through torch.compile, and a clean fallback without it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_config

from mim4dd.compiled import MaybeCompiled, forward
from mim4dd.distill import Distiller


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (without one: the fallback)")
def test_a_compiled_dm_step_matches_the_plain_one(digits):
    plain = Distiller(tiny_config(lam=0.8), digits)
    compiled = Distiller(tiny_config(lam=0.8, compile=True), digits)
    assert compiled.objective._real_features.compiled is not None
    for _ in range(2):
        a, b = plain.step(), compiled.step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert compiled.objective._real_features.compiled is not None  # it did not fall back
    torch.testing.assert_close(compiled.images, plain.images, rtol=1e-4, atol=1e-5)


def test_a_failed_compile_falls_back_to_the_plain_call(caplog):
    net, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    call = MaybeCompiled(forward, enabled=True)

    def cannot_compile(*args):
        raise RuntimeError("no C++ compiler found\nlong details")

    call.compiled = cannot_compile  # what torch.compile raises on a machine without a compiler
    torch.testing.assert_close(call(net, x), net(x))
    assert call.compiled is None and "no C++ compiler found" in caplog.text
