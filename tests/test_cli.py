"""The dragrt command: info tells the truth, unfinished commands say so, bad input gets one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from dragrt import cli


def test_info_json_reports_versions_devices_and_kernels(capsys) -> None:
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert info["devices"][0]["type"] == "cpu"
    assert (len(info["devices"]) > 1) == torch.cuda.is_available()
    ops = info["kernels"]
    assert {"bilinear_sample", "patch_track", "masked_blend"} <= set(ops)
    for op in ops.values():
        assert op["reference"]["cpu"] == "usable"
        assert set(op["triton"]) == {"cpu", "cuda"}
    if not torch.cuda.is_available():
        assert info["cuda_unavailable_reason"]
        assert ops["patch_track"]["triton"]["cuda"] != "usable"


def test_info_text_explains_refusals(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel implementations" in out and "patch_track" in out
    if not torch.cuda.is_available():
        assert "set TRITON_INTERPRET=1" in out
        assert "no GPU:" in out


@pytest.mark.parametrize("command", ["export", "serve"])
@pytest.mark.parametrize("rest", [[], ["--help"], ["-h"], ["model", "--flag"]])
def test_unfinished_commands_say_so_and_fail(command, rest, capsys) -> None:
    assert cli.main([command, *rest]) == cli.EXIT_NOT_AVAILABLE
    err = capsys.readouterr().err
    assert "not available yet" in err and "issue" in err


def test_no_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_bad_size_is_one_clear_error(capsys, tmp_path) -> None:
    assert cli.main(["demo", "--model", "discs", "--size", "7", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "size=7 is not allowed" in err and "64 to 1024" in err
    assert "Traceback" not in err
    # a size option of another model is refused, not ignored
    assert cli.main(["demo", "--model", "stylegan2-random", "--size", "128", "--out", str(tmp_path)]) == 2
    assert "--size is for --model discs, not stylegan2-random" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "discs", "--resolution", "512", "--out", str(tmp_path)]) == 2
    assert "--resolution is for --model stylegan2-random, not discs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "-3"], "--steps=-3 is not allowed; use an integer from 1 to 10000"),
    (["--steps", "10001"], "--steps=10001 is not allowed"),
    (["--seed", "-1"], "--seed=-1 is not allowed; use an integer from 0 to 2**32 - 1"),
    (["--out", "FILE"], "is a file; give a folder"),
])
def test_demo_bad_shared_flags_are_named_as_typed(flags, message, capsys, tmp_path) -> None:
    (tmp_path / "FILE").write_text("keep me")
    flags = [str(tmp_path / f) if f == "FILE" else f for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "new")]
    assert cli.main(["demo", "--model", "discs", *flags, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"] and (tmp_path / "FILE").read_text() == "keep me"


def test_convert_stylegan2_round_trip_through_the_cli(tmp_path, capsys) -> None:
    """dragrt convert stylegan2 reads a rosinality-layout .pt and writes safetensors + JSON."""
    from dragrt.runtime.models import stylegan2_convert as conv

    assert cli.main(["convert"]) == 2
    assert "stylegan2" in capsys.readouterr().err
    assert cli.main(["convert", "stylegan2", str(tmp_path / "missing.pkl"), str(tmp_path / "out")]) == 1
    assert "error" in capsys.readouterr().err
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    assert cli.main(["convert", "stylegan2", str(bad), str(tmp_path / "out")]) in (1, 2)
    assert not (tmp_path / "out.safetensors").exists()
    assert hasattr(conv, "main")


@pytest.mark.parametrize("argv, expect", [
    (["bench", "-h"], "usage: dragrt bench"),
    (["bench", "list"], "dragdiffusion-step"),
    (["convert", "--help"], "usage: dragrt convert {stylegan2}"),
])
def test_forwarding_commands_take_their_own_options(argv, expect, capsys) -> None:
    """`dragrt bench -h` and `dragrt convert -h` print their help (argparse's REMAINDER would reject a leading -h)."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own -h exits 0
        rc = exc.code
    assert rc == 0
    assert expect in capsys.readouterr().out


def test_convert_without_a_kind_names_the_choices(capsys) -> None:
    assert cli.main(["convert"]) == 2
    assert "choose what to convert: stylegan2" in capsys.readouterr().err


def test_info_lists_the_zoo_with_aliases_and_provisional_models(capsys, monkeypatch, tmp_path) -> None:
    from dragrt.zoo import registry

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "faces-sd" / "vae").mkdir(parents=True)
    (tmp_path / "faces-sd" / "vae" / "w.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "faces-sd" / "MODEL_CARD.md").write_text("# faces-sd\n\n**Below target:** 0.5 against 0.8\n")
    (tmp_path / "faces-sd" / "model_index.json").write_text("{}")
    (tmp_path / "faces-vae").mkdir()
    (tmp_path / "faces-vae" / registry.ALIAS_FILE).write_text('{"target": "faces-sd/vae"}')
    assert cli.main(["info", "--json"]) == 0
    zoo = json.loads(capsys.readouterr().out)["zoo"]
    assert zoo["faces-vae"] == {"installed": True, "path": str(tmp_path / "faces-sd" / "vae"), "bytes": 1000,
                                "stored_in": "faces-sd/vae", "below_target": False}
    assert zoo["faces-sd"]["below_target"] and zoo["faces-sd"]["bytes"] == 1002
    sg2 = zoo["faces-stylegan2"]
    assert not sg2["installed"] and "dragrt.zoo.train faces-stylegan2" in sg2["train"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    width = max(len(name) for name in zoo)  # names padded to the longest: one column of sizes
    assert f"  {'faces-vae':<{width}} 0.0 MB; the files of faces-sd/vae/ (stored once)" in text
    assert "provisional: below its target" in text
    assert f"  {'faces-stylegan2':<{width}} not installed; train it with" in text
