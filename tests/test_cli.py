"""The `ingot` command, run in-process on the embedded SmolLM2 model."""

import io
import json

import pytest

from ingot.cli import build_parser, main

COMMANDS = ["run", "chat", "inspect", "models", "serve", "convert", "keygen", "sign", "verify", "perplexity"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ingot" in out
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_every_command_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


def test_run_json(capsys, smollm2_path):
    assert main(["run", str(smollm2_path), "-p", "The capital of France is", "-n", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"].strip()
    assert result["stats"]["generated_tokens"] == 8
    assert result["stats"]["prompt_tokens"] > 0


def test_run_sampling_with_penalties(capsys, smollm2_path):
    """Every sampling flag at once on the CPU path; a seed makes the run reproducible."""
    args = ["run", str(smollm2_path), "-p", "Hello", "-n", "8", "--json", "--temp", "0.7", "--top-p", "0.9",
            "--top-k", "40", "--min-p", "0.05", "--repeat-penalty", "1.1", "--presence-penalty", "0.5",
            "--frequency-penalty", "0.5", "--seed", "1"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["text"] == first["text"]
    assert first["stats"]["generated_tokens"] >= 1


def test_run_streams_text_and_stats(capsys, smollm2_path):
    assert main(["run", str(smollm2_path), "--chat", "--system", "Be brief.", "-p", "Say hi", "-n", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "tok/s" in captured.err and "tok/s" not in captured.out


def test_chat_piped_stdin_keeps_history(monkeypatch, capsys, smollm2_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Ada.\n/reset\nWhat is 1+1?\n/exit\nnever read\n"))
    assert main(["chat", str(smollm2_path), "-n", "10"]) == 0
    captured = capsys.readouterr()
    replies = [line for line in captured.out.splitlines() if line.strip()]
    assert len(replies) >= 2  # one reply per message, the text after /exit is never sent
    assert "history cleared" in captured.err


def test_inspect(capsys, smollm2_path):
    assert main(["inspect", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    for needle in ("llama", "Q4_1", "Q8_0", "F32", "total", "layers", "49152"):
        assert needle in out
    assert main(["inspect", str(smollm2_path), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["hyperparameters"]["layers"] == 30
    assert len(info["tensors"]) == 272
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])


def test_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_error_has_no_traceback(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ingot: error:") and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--max-queue", "0"], ["--request-timeout", "0"], ["--port", "70000"],
                                   ["--max-batch", "0"], ["--kv-blocks", "0"], ["--kv-cache-gb", "-2"],
                                   ["--step-tokens", "0"]])
def test_serve_refuses_bad_settings_before_loading(flags, capsys):
    assert main(["serve", "no-such-model", *flags]) == 1
    assert flags[0] in capsys.readouterr().err


def test_serve_takes_kv_blocks_or_kv_cache_gb_not_both(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "no-such-model", "--kv-blocks", "64", "--kv-cache-gb", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
