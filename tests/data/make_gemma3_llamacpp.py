#!/usr/bin/env python3
"""Produce tests/data/gemma3_llamacpp.json: llama.cpp reference tokenizations and
greedy continuations for the Gemma 3 270M Q4_K_M GGUF.

Driven by tests/data/make_gemma3_llamacpp.sh, which builds llama.cpp (the copy vendored
in the llama-cpp-python 0.3.36 sdist) and calls:

    python make_gemma3_llamacpp.py --llama-bin DIR --model GGUF --llama-src DIR --out JSON

Only the Python standard library (plus the optional `gguf` package, used for a sanity
check that the generated ids decode to the text llama.cpp printed) is needed.

How exact generated token ids are obtained
------------------------------------------
llama-completion prints text, not ids. With `--prompt-cache FILE --prompt-cache-all` it
saves, at the end of the run, a session file whose header is
    u32 magic 'ggsn', u32 version, u32 n_tokens, i32 tokens[n_tokens]
holding every token it evaluated or sampled: the prompt ids followed by all generated
ids (the last sampled token is appended before saving). We read the ids from that
header. A second run of the same command without the prompt cache gives the clean
stdout text; the script checks that both runs print the same continuation, that the
session's prompt part equals llama-tokenize's ids and `--verbose-prompt`'s ids, and that
the ids decode (via the GGUF vocab) to the printed text. Re-tokenizing prompt+text with
llama-tokenize is recorded as an extra, informative check only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

# --------------------------------------------------------------------------------------
# Inputs

TOKENIZE_CASES: list[str] = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    between  words",
    "   ",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues\r\nwindows line end\r\n",
    "\n\n\n\n\n\nsix newlines then text\t\t\ttabs",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tdef bar(self):\n\t\tpass\n",
    "```python\nfor i in range(10):\n        print(i ** 2)  # squares\n```",
    "3.14159 1234567890 1,000,000 -42 0x1F 1e-9 2024-06-01 12:30:45",
    "Wait... what?! (yes) [no] {maybe} \"quoted\" 'single' \u2014 en\u2013dash; semi;colon: @#$%^&*_+=|\\/~`",
    "Caf\u00e9 na\u00efve fa\u00e7ade r\u00e9sum\u00e9 \u00c5ngstr\u00f6m Stra\u00dfe \u0153uvre \u00e1\u00e9\u00ed\u00f3\u00fa \u00f1",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc785\ub2c8\ub2e4.",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645! \u0634\u0643\u0631\u0627 \u062c\u0632\u064a\u0644\u0627",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5 \u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "I love \U0001F355 and \U0001F389\U0001F389! \U0001F600\U0001F44D\U0001F3FD",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 \U0001F469\U0001F3FD\u200d\U0001F4BB \U0001F3F3\ufe0f\u200d\U0001F308",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>Hello <bos> world",
    "<eos><pad><unk> <start_of_image> <end_of_turn>x",
    "",
    "\U00010348\U00013000\U0001D11E\ue000\U000F0000\u0007\u007f\ufffd\u2ffb\U0001FAE8",
    "Visit https://example.com/a/b?q=1&r=two#frag or mail first.last@example.org",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!????....----====",
    "# Title\n\n* item one\n* item two\n\n| a | b |\n|---|---|\n| 1 | 2 |",
]

GREEDY_PROMPTS: list[str] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Here is a list of fruits:\n1. Apple\n2.",
    "Question: What is the boiling point of water in degrees Celsius?\nAnswer:",
    "<start_of_turn>user\nWrite a short poem about the ocean.<end_of_turn>\n<start_of_turn>model\n",
    "Translate to French: Good morning, my friend.\nFrench:",
]

N_PREDICT = 32
SEED = 42
CTX = 512

# Flags. llama-tokenize parses special tokens by default (its per-tool default,
# LLAMA_EXAMPLE_TOKENIZE -> params.parse_special = true); we record both modes.
TOKENIZE_FLAGS = ["--ids", "--no-escape", "--log-disable"]
COMPLETION_FLAGS = [
    "-no-cnv", "--no-escape", "--no-display-prompt", "--verbose-prompt",
    "-n", str(N_PREDICT), "--temp", "0", "--top-k", "1", "--top-p", "1.0", "--min-p", "0.0",
    "--repeat-penalty", "1.0", "--seed", str(SEED), "-c", str(CTX),
]

SESSION_MAGIC = 0x6767736E  # 'ggsn'

# --------------------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode("utf-8", "replace")[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {cmd!r}")
    return p


def tokenize(bin_dir: str, model: str, text: str, parse_special: bool, tmp: str) -> list[int]:
    path = os.path.join(tmp, "tok.txt")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    cmd = [os.path.join(bin_dir, "llama-tokenize"), "-m", model, "-f", path, *TOKENIZE_FLAGS]
    if not parse_special:
        cmd.append("--no-parse-special")
    out = run(cmd).stdout.decode("utf-8")
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    if len(lines) != 1:
        raise SystemExit(f"unexpected llama-tokenize output for {text!r}: {out!r}")
    return json.loads(lines[0])


def read_session_tokens(path: str) -> list[int]:
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<III", f.read(12))
        if magic != SESSION_MAGIC:
            raise SystemExit(f"bad session magic {magic:#x} in {path}")
        toks = list(struct.unpack(f"<{n}i", f.read(4 * n)))
    return toks


VERBOSE_HDR = re.compile(r"number of tokens in prompt = (\d+)")
# log lines look like "0.01.936.666 I      2 -> '<bos>'" (timestamp + level prefix on stderr)
VERBOSE_TOK = re.compile(r"^(?:[\d.]+ I )?\s*(\d+) -> '", re.M)


def parse_verbose_prompt(stderr: str) -> list[int]:
    m = VERBOSE_HDR.search(stderr)
    if not m:
        raise SystemExit("no --verbose-prompt output found")
    n = int(m.group(1))
    ids = [int(x) for x in VERBOSE_TOK.findall(stderr[m.end():])][:n]
    if len(ids) != n:
        raise SystemExit(f"--verbose-prompt: expected {n} ids, parsed {len(ids)}")
    return ids


class Vocab:
    """Minimal piece decoder for the GGUF vocab (SPM style, as llama.cpp renders it with
    special=false: control tokens render as empty)."""

    def __init__(self, model: str):
        import gguf  # noqa: PLC0415

        r = gguf.GGUFReader(model)
        f = r.fields["tokenizer.ggml.tokens"]
        self.tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        t = r.fields["tokenizer.ggml.token_type"]
        self.types = [int(t.parts[i][0]) for i in t.data]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            s, ty = self.tokens[i], self.types[i]
            if ty == 6:  # BYTE
                out.append(int(s[3:5], 16))
            elif ty in (3,):  # CONTROL
                continue
            else:
                out += s.replace("\u2581", " ").encode("utf-8")
        return out.decode("utf-8", "replace")


def generic(cmd: list[str], bin_dir: str, model: str, extra: dict[str, str] | None = None) -> str:
    """Render a command with generic paths ($LLAMA_BIN, $MODEL, ...)."""
    import shlex

    parts = []
    for a in cmd:
        if a.startswith(bin_dir + os.sep):
            a = "$LLAMA_BIN/" + os.path.basename(a)
        elif a == model:
            a = "$MODEL"
        for k, v in (extra or {}).items():
            if a == v:
                a = k
        parts.append(a if a.startswith("$") else shlex.quote(a))
    return " ".join(parts)


def completion(bin_dir: str, model: str, prompt: str, threads: int, tmp: str, session: str | None):
    cmd = [os.path.join(bin_dir, "llama-completion"), "-m", model, "-p", prompt, *COMPLETION_FLAGS,
           "-t", str(threads)]
    if session:
        if os.path.exists(session):
            os.remove(session)
        cmd += ["--prompt-cache", session, "--prompt-cache-all"]
    p = run(cmd, cwd=tmp)
    return cmd, p.stdout.decode("utf-8"), p.stderr.decode("utf-8", "replace")


def version_info(bin_dir: str, src_dir: str | None) -> dict:
    p = subprocess.run([os.path.join(bin_dir, "llama-completion"), "--version"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    txt = p.stdout.decode("utf-8", "replace")
    info: dict = {"llama_cpp_python_sdist": "llama-cpp-python==0.3.36 (vendor/llama.cpp)",
                  "version_output": [ln for ln in txt.splitlines() if ln.strip()]}
    m = re.search(r"version:\s*(\S+)\s*\(build (\d+), commit (\w+)\)", txt)
    if m:
        info["version"] = m.group(1)
        info["build_number"] = int(m.group(2))
        info["build_commit_short"] = m.group(3)
    if src_dir:
        try:
            g = lambda *a: subprocess.run(["git", "-C", src_dir, *a], stdout=subprocess.PIPE,  # noqa: E731
                                          check=True).stdout.decode().strip()
            info["commit"] = g("rev-parse", "HEAD")
            info["commit_date"] = g("log", "-1", "--format=%cI")
            info["commit_subject"] = g("log", "-1", "--format=%s")
            info["note"] = ("the sdist ships a shallow (depth 1) git checkout, so the reported build "
                            "number is the commit count of that shallow clone, not upstream's bNNNN tag")
        except Exception as e:  # noqa: BLE001
            info["commit_error"] = str(e)
    return info


def dumps(data: dict) -> str:
    """Indented JSON, but with lists of integers kept on one line."""
    txt = json.dumps(data, ensure_ascii=True, indent=1)
    # indent=1 puts each element on its own line; strings never contain raw newlines,
    # so requiring "\n" here only touches pretty-printed integer lists.
    txt = re.sub(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]",
                 lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", txt)
    return txt + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama-src", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cmake-flags", default="")
    args = ap.parse_args()
    bin_dir = os.path.abspath(args.llama_bin)
    model = os.path.abspath(args.model)

    h = hashlib.sha256()
    with open(model, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)

    try:
        vocab = Vocab(model)
    except ImportError:
        vocab = None
        print("warning: gguf not importable; skipping decode checks", file=sys.stderr)

    tmp = tempfile.mkdtemp(prefix="gemma3_llamacpp_")
    tok_cmd = [os.path.join(bin_dir, "llama-tokenize"), "-m", model, "-f", "$TEXT_FILE", *TOKENIZE_FLAGS]

    toks = []
    for text in TOKENIZE_CASES:
        ids = tokenize(bin_dir, model, text, True, tmp)
        ids_ns = tokenize(bin_dir, model, text, False, tmp)
        entry = {"text": text, "ids": ids, "ids_no_parse_special": ids_ns}
        toks.append(entry)
        if vocab is not None and vocab.decode(ids_ns) != text:
            print(f"note: decode(ids_no_parse_special) != text for {text!r}: {vocab.decode(ids_ns)!r}",
                  file=sys.stderr)
        print(f"tokenize {text[:30]!r}: {len(ids)} ids", file=sys.stderr)

    greedy = []
    session = os.path.join(tmp, "session.bin")
    for prompt in GREEDY_PROMPTS:
        prompt_ids = tokenize(bin_dir, model, prompt, True, tmp)
        # run 1: plain, stdout = continuation text (+ "\n\n" trailer, + " [end of text]\n" on EOG)
        cmd1, out1, err1 = completion(bin_dir, model, prompt, args.threads, tmp, None)
        # run 2: identical + session file -> exact ids
        cmd2, out2, err2 = completion(bin_dir, model, prompt, args.threads, tmp, session)
        sess = read_session_tokens(session)
        vp_ids = parse_verbose_prompt(err1)
        assert vp_ids == prompt_ids, (prompt, vp_ids, prompt_ids)
        assert sess[: len(prompt_ids)] == prompt_ids, (prompt, sess, prompt_ids)
        gen = sess[len(prompt_ids):]

        end_of_text = False
        assert out1.endswith("\n\n"), repr(out1[-40:])
        text = out1[:-2]
        if text.endswith(" [end of text]\n"):
            text = text[: -len(" [end of text]\n")]
            end_of_text = True
        trailer = f"\nllama_completion: saving final output to session file '{session}'\n\n\n"
        text2 = out2
        if text2.endswith(trailer):
            text2 = text2[: -len(trailer)]
        if end_of_text:
            text2 = text2[: -len(" [end of text]\n")] if text2.endswith(" [end of text]\n") else text2
        assert text2 == text, (prompt, text, text2)
        assert len(gen) == N_PREDICT or end_of_text, (prompt, len(gen))

        decoded = vocab.decode(gen) if vocab is not None else None
        if decoded is not None:
            assert decoded == text, (prompt, decoded, text)

        retok = tokenize(bin_dir, model, prompt + text, True, tmp)
        greedy.append({
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "generated_ids": gen,
            "generated_text": text,
            "stopped_at_eog": end_of_text,
            "retokenized_prompt_plus_text": retok,
            "retokenization_prefix_matches_prompt": retok[: len(prompt_ids)] == prompt_ids,
            "retokenization_equals_prompt_plus_generated": retok == prompt_ids + gen,
            "command": generic(cmd1, bin_dir, model),
        })
        print(f"greedy {prompt[:30]!r}: {len(gen)} ids -> {text[:60]!r}", file=sys.stderr)

    data = {
        "description": ("Reference outputs of llama.cpp (CPU) for the Gemma 3 270M Q4_K_M GGUF: "
                        "tokenizations and greedy continuations. Made by tests/data/make_gemma3_llamacpp.sh."),
        "model_file": os.path.basename(model),
        "model_sha256": h.hexdigest(),
        "llama_cpp": version_info(bin_dir, args.llama_src),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commands": {
            "build": ("cmake -S $LLAMA_SRC -B $BUILD -DCMAKE_BUILD_TYPE=Release " + args.cmake_flags
                      + " && cmake --build $BUILD -j2 --target llama-tokenize llama-completion").replace("  ", " "),
            "tokenize": generic(tok_cmd, bin_dir, model),
            "tokenize_no_parse_special": generic(tok_cmd, bin_dir, model) + " --no-parse-special",
            "tokenize_notes": ("$TEXT_FILE holds the text's exact UTF-8 bytes (-f reads it verbatim, "
                               "--no-escape keeps backslashes literal). llama-tokenize's default is to parse "
                               "special tokens (\"ids\"); \"ids_no_parse_special\" adds --no-parse-special. "
                               "BOS (id 2) is added because the GGUF sets tokenizer.ggml.add_bos_token."),
            "greedy": generic([os.path.join(bin_dir, "llama-completion"), "-m", model, "-p", "$PROMPT",
                               *COMPLETION_FLAGS, "-t", str(args.threads)], bin_dir, model),
            "greedy_ids": ("same command + --prompt-cache $SESSION --prompt-cache-all; generated_ids = "
                           "session-file tokens after the prompt ids (header: u32 magic 'ggsn', u32 version, "
                           "u32 n, i32[n] tokens)"),
            "greedy_notes": ("$PROMPT is passed as one argv element with real newlines; llama-completion "
                             "tokenizes it with add_special=true, parse_special=true (BOS added, Gemma turn "
                             "markers parsed as control tokens). generated_text is the stdout of the plain "
                             "run with llama-completion's trailing \"\\n\\n\" removed."),
        },
        "tokenize": toks,
        "greedy": greedy,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dumps(data))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
