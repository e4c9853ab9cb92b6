"""The `ingot` command."""

from __future__ import annotations

import argparse
import json
import sys

from ingot.errors import IngotError


def _add_model(p):
    p.add_argument("model", help="a .gguf file, a Hugging Face or MLX folder, or an embedded name (ingot models)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is present)")
    p.add_argument("-c", "--ctx", type=int, default=None, metavar="N",
                   help="context length in tokens (default: the model's, at most 4096)")


def _add_sampling(p):
    p.add_argument("-n", "--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    p.add_argument("--temp", type=float, default=0.0, metavar="T", help="temperature; 0 is greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--min-p", type=float, default=None, metavar="P", help="drop tokens below P x the top prob")
    p.add_argument("--repeat-penalty", type=float, default=None, metavar="R",
                   help="penalise the last 64 tokens (1.0 = off)")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="P",
                   help="OpenAI's presence penalty, -2..2: subtract P from every token seen in the last 64")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="F",
                   help="OpenAI's frequency penalty, -2..2: subtract F per occurrence in the last 64")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")


def _add_progress(p):
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: for work over 100 MB)")


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)


def _load(args):
    import ingot

    return ingot.load(args.model, device=args.device, max_context=args.ctx)


def _stats_line(s) -> str:
    return (f"[{s.prompt_tokens} prompt tokens, {s.prefill_tok_s:.1f} tok/s | {s.generated_tokens} generated, "
            f"{s.decode_tok_s:.1f} tok/s | first token after {s.ttft_s * 1000:.0f} ms]")


def cmd_run(args) -> int:
    model = _load(args)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        kwargs = dict(messages=messages + [{"role": "user", "content": args.prompt}])
    else:
        kwargs = dict(prompt=args.prompt)
    if args.json:
        text = model.generate(**kwargs, **_sampling(args))
        print(json.dumps({"text": text, "stats": model.last_stats.as_dict()}, ensure_ascii=False))
        return 0
    for piece in model.stream(**kwargs, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_stats_line(model.last_stats), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print(f"Chatting with {model.path.name}. /reset clears the history, /exit quits, "
              "Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        stream = model.stream(messages=system + history, **_sampling(args))
        try:
            for piece in stream:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose:
            print(_stats_line(model.last_stats), file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from ingot.inspect import describe

    print(describe(args.model, show_tensors=args.tensors, as_json=args.json))
    if args.verify:
        from ingot.formats.native import NativeFile, is_native
        from ingot.registry import resolve

        path = resolve(args.model)
        if not path.is_file() or not is_native(path):
            raise IngotError(f"{path}: --verify checks the tensor hashes of .ingot files; this is not one")
        n = NativeFile(path).verify(progress=args.progress)
        print(f"verified: all {n} tensors match their xxh3 hashes", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from ingot.formats.native import convert

    report = convert(args.source, args.output, quant=args.quant, group_size=args.group_size, profile=args.profile,
                     requantize=args.requantize, progress=args.progress)
    if args.report:
        print(report.table())
    worst = max(report.tensors, key=lambda t: t.rel_error)
    lossy = sum(t.rel_error > 0 for t in report.tensors)
    print(f"wrote {report.path} ({report.bytes / 2**20:.1f} MiB, {len(report.tensors)} tensors, "
          f"{report.seconds:.1f} s); {lossy} quantized, worst relative error {worst.rel_error:.2e} "
          f"({worst.name})" + ("" if args.report else "; --report lists every tensor"))
    kept = [t for t in report.tensors if t.note.startswith("kept")]
    if kept:
        print(f"{len(kept)} tensors were already quantized and were repacked exactly, not requantized "
              "(--requantize to requantize them)", file=sys.stderr)
    return 0


def cmd_keygen(args) -> int:
    from ingot.signing import keygen

    key, pub = keygen(args.output)
    print(f"wrote {key} (private: keep it secret) and {pub} (public: give it to whoever verifies)")
    return 0


def cmd_sign(args) -> int:
    from ingot.signing import sign

    print(f"wrote {sign(args.file, args.key, progress=args.progress)}")
    return 0


def cmd_verify(args) -> int:
    from ingot.signing import verify

    verify(args.file, args.pubkey, args.sig, progress=args.progress)
    print(f"{args.file}: signature OK")
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from ingot.bench.perplexity import perplexity

    path = Path(args.file)
    if not path.is_file():
        raise IngotError(f"{path}: no such text file")
    model = _load(args)
    ppl = perplexity(model, text=path.read_text(), window=args.ctx)
    print(f"{ppl:.4f}" if not args.json else json.dumps({"perplexity": ppl, "window": model.max_context}))
    return 0


def cmd_bench(args) -> int:
    from ingot.bench.bench import run_cli

    return run_cli(args)


def cmd_serve(args) -> int:
    from ingot.server.serve import serve

    return serve(args)


def cmd_models(args) -> int:
    from ingot.registry import embedded_models

    for row in embedded_models():
        print(f"{row['name']:<14} {row['model']}\n{'':<14} {row['path']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingot",
        description="Ingot: fast local LLM inference. Runs GGUF and .ingot files, Hugging Face and MLX folders.",
        epilog="Try: ingot run smollm2-135m --chat -p 'Hello!'",
    )
    parser.add_argument("--version", action="version", version=f"ingot {__import__('ingot').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="complete one prompt, streamed to stdout",
                       description="Complete one prompt and stream the answer to stdout (stats go to stderr).")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="a system message (implies --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and the stats")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with the model's template",
                       description="Interactive chat. Keeps the history; /reset clears it, /exit quits; Ctrl-C "
                                   "stops a reply. Reads one message per line when stdin is piped.")
    _add_model(p)
    p.add_argument("--system", default=None, help="a system message for the whole chat")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed after each reply")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="architecture, hyperparameters, tokenizer and tensors of a model",
                       description="Describe a model file or folder without loading its weights.")
    p.add_argument("model", help="a .gguf file, a Hugging Face or MLX folder, or an embedded name")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="for an .ingot file: check every tensor's xxh3 hash")
    _add_progress(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="write an .ingot file (kernel layout, fast to load) from a model",
                       description="Convert a GGUF file or a Hugging Face / MLX folder into an .ingot file: the "
                                   "tensors already in the CUDA kernels' layout (QKV and gate/up fused), so that "
                                   "loading it is a memory map and one copy to the GPU. Already-quantized tensors "
                                   "(GGUF, MLX) are repacked exactly; float tensors are quantized round-to-nearest "
                                   "per group when --quant or --profile asks. Without either, every tensor keeps "
                                   "its stored type. The file appears only once it is complete.",
                       epilog="Try: ingot convert my-hf-folder -o model.ingot --profile q4")
    p.add_argument("source", help="a .gguf file, a Hugging Face or MLX folder, or an embedded name")
    p.add_argument("-o", "--output", required=True, metavar="OUT.ingot", help="the file to write")
    p.add_argument("--quant", choices=["q4", "q8", "bf16", "f16"], default=None,
                   help="every float matrix in this type (embedding and lm_head included)")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="a named mix: q4 (q4, with q8 embedding and lm_head), q4-pure, q8, f16, bf16")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32,
                   help="elements per q4/q8 scale when quantizing floats (default 32)")
    p.add_argument("--requantize", action="store_true",
                   help="also requantize tensors that are already quantized (lossy twice; off by default)")
    p.add_argument("--report", action="store_true", help="print every tensor's stored type and relative error")
    _add_progress(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("keygen", help="make an ed25519 key pair for signing .ingot files",
                       description="Write NAME.key (private, mode 600) and NAME.pub (public), PEM-encoded.")
    p.add_argument("-o", "--output", default="ingot", metavar="NAME", help="file name stem (default: ingot)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign an .ingot file (writes FILE.sig)",
                       description="Sign the header and the SHA-256 of the tensor data of an .ingot file with "
                                   "an ed25519 private key; the signature goes to FILE.sig.")
    p.add_argument("file", help="the .ingot file")
    p.add_argument("--key", required=True, metavar="K", help="the private key (from ingot keygen)")
    _add_progress(p)
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="check an .ingot file's signature",
                       description="Check FILE.sig against the file as it is now with a public key: any changed "
                                   "byte, in the header or the tensors, fails. Exit status 1 on failure.")
    p.add_argument("file", help="the .ingot file")
    p.add_argument("--pubkey", required=True, metavar="P", help="the signer's public key (NAME.pub)")
    p.add_argument("--sig", default=None, help="the signature file (default: FILE.sig)")
    _add_progress(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text file",
                       description="exp of the mean negative log-likelihood of every token of a text file given "
                                   "the ones before it, in windows of the context length (each from an empty "
                                   "cache). Compare conversions of one model on one text at one --ctx.")
    _add_model(p)
    p.add_argument("-f", "--file", required=True, help="the text file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="llama-bench-style prefill (ppN) and decode (tgN) throughput",
                       description="Prefill and decode throughput, mean and sd over repetitions, like llama-bench.")
    from ingot.bench.bench import add_arguments as _bench_arguments

    _bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for one model",
                       description="Serve one model over OpenAI's HTTP API: POST /v1/chat/completions and "
                                   "/v1/completions (streamed as server-sent events with \"stream\": true), "
                                   "GET /v1/models, GET /health and GET /metrics (Prometheus). Requests are batched "
                                   "continuously over a paged KV cache with prefix caching (--max-batch 1: one "
                                   "at a time, through the CUDA backend's single-stream decode graphs); the "
                                   "clients' model name is MODEL as given here. SIGTERM lets running requests "
                                   "finish, then exits; Ctrl-C too.",
                       epilog="Try: ingot serve smollm2-135m, then point an OpenAI client at "
                              "http://127.0.0.1:8080/v1 (any API key unless --api-key is set).")
    p.add_argument("model", metavar="MODEL",
                   help="a .gguf file, a Hugging Face or MLX folder, or an embedded name (ingot models)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("-c", "--max-context", "--ctx", dest="ctx", type=int, default=None, metavar="N",
                   help="context length in tokens (default: the model's, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for their turn; past that, 429 with Retry-After (default 64)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds a request may take, waiting included, before it is stopped (default 600)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu or cuda (default: cuda when a GPU is present)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests generated together at most; more wait in the queue (default 16)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                    help="KV cache size in blocks of 16 positions (default: room for --max-batch full contexts)")
    kv.add_argument("--kv-cache-gb", type=float, default=None, metavar="G",
                    help="KV cache size in GiB, instead of --kv-blocks")
    p.add_argument("--step-tokens", type=int, default=2048, metavar="N",
                   help="tokens one batched step may carry: a token for each running request, then chunks of "
                        "waiting prompts (default 2048); more lets more prompts start in one step, at the cost "
                        "of that step's delay to the running streams")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a prompt prefix seen before, e.g. a repeated system prompt "
                        "(default: on)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="the embedded models and where their files are",
                       description="List the models that installed Python packages ship.")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except IngotError as e:
        print(f"ingot: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
