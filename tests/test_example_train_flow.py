"""Smoke test: the example flow trains a few steps on fresh noise and reports finite bits/dim."""
import importlib.util
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_flow_runs_and_reports_finite_bits_per_dim(image_folder, tmp_path, cli, capsys):
    root, _ = image_folder
    out = tmp_path / "out"
    assert cli("encode", root, "-o", out, "--shard-size", 5, "-q").exit_code == 0
    spec = importlib.util.spec_from_file_location("train_flow", os.path.join(ROOT, "examples", "train_flow.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main([str(out), "--epochs", "2", "--steps", "2", "--batch-size", "4", "--layers", "2",
                    "--hidden", "16", "--draws", "3"])
    printed = capsys.readouterr().out
    assert "epoch   1" in printed and "importance-weighted" in printed
    numbers = res["train"] + res["test"] + [res["test_iw"]]
    assert len(numbers) == 5 and all(math.isfinite(v) and 0 < v < 100 for v in numbers)


def test_the_readmes_training_loop_runs_as_printed(image_folder, tmp_path, cli, monkeypatch):
    """README's "In a training loop" block, run as printed on an encoded folder (a model of log p = 0)."""
    import re

    import numpy as np

    src, _ = image_folder
    assert cli("encode", src, "-o", tmp_path / "out").exit_code == 0
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## In a training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)

    class Model:
        def log_prob(self, y):
            import tensorflow as tf

            return tf.zeros(tf.shape(y)[0])

    scope = {"model": Model()}
    exec(compile(code, "README.md", "exec"), scope)
    assert np.isfinite(scope["bpd"].numpy()).all() and scope["x"].dtype == np.uint8
