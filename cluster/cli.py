"""The `expertmesh` command line.

    expertmesh generate --model PATH_OR_NAME (--prompt TEXT | --chat TEXT | --prompt-token-ids 1,2,3)
                        --max-tokens N [--temperature T] [--seed S] [--json]
                        [--expert-groups N --transport local|collective|grpc] [--overlap]
    expertmesh chat --model PATH_OR_NAME
    expertmesh serve [--config FILE]     (the OpenAI-compatible cluster; see cluster/serve.py)
    expertmesh convert [--model smollm2-moe] [--output DIR]
    expertmesh hash-key [--new]          (an API key on stdin -> its sha256: hash for the config)
    expertmesh bench engine --model PATH_OR_NAME
    expertmesh bench dispatch --model PATH_OR_NAME
    expertmesh bench affinity --model PATH_OR_NAME

The `generate` contract (flags and the --json keys token_ids and text) is
relied on from outside the project; keep it stable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids must be comma-separated integers, got {text!r}") from None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-moe",
                   help="a Hugging Face checkpoint directory, or 'smollm2-moe' (the embedded default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None)
    ep = p.add_argument_group("expert parallelism")
    ep.add_argument("--expert-groups", type=int, default=1,
                    help="expert-group actors holding a slice of the experts each (default 1)")
    ep.add_argument("--transport", choices=["local", "collective", "grpc"], default=None,
                    help="local (in-process; the default for 1 group), collective (torch.distributed: "
                         "gloo on CPU, NCCL on GPU; the default for several groups) or grpc")
    ep.add_argument("--expert-assignment", choices=["contiguous", "balanced"], default="contiguous")
    ep.add_argument("--routing-counts", default=None,
                    help="JSON of measured routing counts for --expert-assignment balanced "
                         "(written by generate --record-routing)")
    ep.add_argument("--expert-group-threads", type=int, default=None,
                    help="torch threads per CPU expert group (default: its CPUs, 1)")
    ep.add_argument("--overlap", action="store_true",
                    help="overlap two decode micro-batches' attention and expert round trips")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the model's generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Serve sparse Mixture-of-Experts models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    _add_engine_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw text, tokenized as is")
    source.add_argument("--chat", help="a user message, rendered with the model's chat format")
    source.add_argument("--prompt-token-ids", type=_token_ids, help="comma-separated token ids")
    _add_sampling_args(gen)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (token_ids, text, finish_reason, usage) instead of streaming")
    gen.add_argument("--record-routing", type=Path, default=None, metavar="FILE",
                     help="write the tokens routed to each expert per layer (for balanced assignment)")

    chat = sub.add_parser("chat", help="an interactive chat with the model")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="a system message")

    srv = sub.add_parser("serve", help="deploy the OpenAI-compatible Serve app and block until Ctrl-C")
    srv.add_argument("--config", type=Path, default=None,
                     help="a cluster config YAML (cluster/config.py); default: the embedded smollm2-moe "
                          "with 2 expert groups over the collective transport on 127.0.0.1:8000")

    conv = sub.add_parser("convert", help="convert the embedded default model to a Hugging Face checkpoint")
    conv.add_argument("--model", default="smollm2-moe", choices=["smollm2-moe"])
    conv.add_argument("--output", type=Path, default=None,
                      help="checkpoint directory (default: the cache, $EXPERTMESH_CACHE or ~/.cache/expertmesh)")

    hk = sub.add_parser("hash-key", help="print the hash of an API key (read from stdin) for tenants.NAME.api_keys",
                        description="Reads one API key from stdin (a prompt on a terminal, so it stays out of "
                                    "the shell's history) and prints the 'sha256:<hex>' line the config's "
                                    "tenants.NAME.api_keys holds.")
    hk.add_argument("--new", action="store_true", help="make a fresh random key; print it and its hash")

    bench = sub.add_parser("bench", help="benchmarks against a reference, measured in one run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="the engine against transformers' generate on the same checkpoint")
    eng.add_argument("--model", default="smollm2-moe")
    eng.add_argument("--dtype", default="auto")
    eng.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (a smoke run)")
    disp = bench_sub.add_parser("dispatch", help="local vs collective vs grpc expert groups, and the raw send/recv floor")
    disp.add_argument("--model", default="smollm2-moe")
    disp.add_argument("--dtype", default="auto")
    disp.add_argument("--quick", action="store_true", help="fewer tokens, groups and repetitions (a smoke run)")
    aff = bench_sub.add_parser("affinity", help="prefix-cache hits of multi-turn conversations on 2 router replicas, "
                                                "session affinity on vs off")
    aff.add_argument("--model", default="smollm2-moe")
    aff.add_argument("--dtype", default="auto")
    aff.add_argument("--conversations", type=int, default=8, help="conversations, all running at once")
    aff.add_argument("--turns", type=int, default=4, help="turns of each conversation")
    aff.add_argument("--kv-blocks", type=int, default=2048, help="KV-cache blocks (16 tokens) of each router replica")
    aff.add_argument("--think-s", type=float, default=2.0, help="mean pause of a user between turns (seconds)")
    aff.add_argument("--quick", action="store_true", help="fewer and shorter conversations (a smoke run)")
    return parser


def _sampling_params(args, engine):
    from router.sampling import SamplingParams

    defaults = engine.generation_defaults()
    pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)
    return SamplingParams(max_tokens=args.max_tokens, temperature=pick(args.temperature, "temperature", 1.0),
                          top_p=pick(args.top_p, "top_p", 1.0), top_k=pick(args.top_k, "top_k", 0),
                          seed=args.seed, stop=tuple(args.stop))


def _engine(args):
    from router.engine import Engine, EngineConfig

    transport = args.transport or ("local" if args.expert_groups == 1 else "collective")
    engine = Engine(args.model, EngineConfig(
        device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, expert_groups=args.expert_groups,
        transport=transport, expert_assignment=args.expert_assignment, routing_counts=args.routing_counts,
        overlap=args.overlap, expert_group_threads=args.expert_group_threads))
    if transport != "local":
        from experts.assignment import describe
        print(f"expertmesh: {args.expert_groups} expert groups over {transport}: "
              f"{describe(engine.transport.assignment)}", file=sys.stderr)
    return engine


def cmd_generate(args) -> int:
    engine = _engine(args)
    if args.prompt_token_ids is not None:
        prompt = args.prompt_token_ids
    elif args.chat is not None:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    else:
        prompt = engine.tokenizer.encode(args.prompt)
    params = _sampling_params(args, engine)
    engine.add_request(prompt, params, request_id="cli")
    token_ids, text, finish = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            token_ids += out.token_ids
            text.append(out.text)
            finish = out.finish_reason
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": "".join(text), "finish_reason": finish,
                          "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(token_ids)}}))
    else:
        sys.stdout.write("\n")
    if args.record_routing:
        args.record_routing.write_text(json.dumps({"model": str(engine.model_dir),
                                                   "moe_layers": list(engine.model_config.moe_layers),
                                                   "counts": engine.routing_counts()}))
    engine.close()
    return 0


def cmd_chat(args) -> int:
    engine = _engine(args)
    params = _sampling_params(args, engine)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"expertmesh chat: {engine.model_dir.name} on {engine.device}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        engine.add_request(engine.tokenizer.encode_chat(messages), params)
        reply = []
        while engine.has_unfinished():
            for out in engine.step():
                reply.append(out.text)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_convert(args) -> int:
    from models import smollm2_moe

    path = smollm2_moe.convert(args.output) if args.output else smollm2_moe.resolve_model(args.model)
    print(path)
    return 0


def cmd_bench(args) -> int:
    if args.bench == "affinity":
        from bench import affinity as bench_affinity

        return bench_affinity.main(model=args.model, dtype=args.dtype, conversations=args.conversations,
                                   turns=args.turns, kv_blocks=args.kv_blocks, think_s=args.think_s,
                                   quick=args.quick)
    if args.bench == "dispatch":
        from bench import dispatch as bench_dispatch

        return bench_dispatch.main(model=args.model, dtype=args.dtype, quick=args.quick)
    from bench import engine as bench_engine

    return bench_engine.main(model=args.model, dtype=args.dtype, quick=args.quick)


def cmd_hash_key(args) -> int:
    from deployments.tenants import hash_key, new_key

    if args.new:
        key = new_key()
        print(f"key:  {key}\nhash: {hash_key(key)}")
        return 0
    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ")
    else:
        lines = sys.stdin.read().splitlines()
        if len(lines) != 1:
            raise ValueError(f"hash-key reads one API key on one line from stdin, got {len(lines)} lines")
        key = lines[0]
    print(hash_key(key))
    return 0


def cmd_serve(args) -> int:
    from cluster import serve

    return serve.run(args.config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "bench": cmd_bench,
                "serve": cmd_serve, "hash-key": cmd_hash_key}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"expertmesh: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
