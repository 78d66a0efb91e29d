"""`python -m gptfast.sample CKPT_OR_OUT_DIR --prompt "..."`: generate text from a checkpoint."""

from __future__ import annotations

import argparse
import sys

from gptfast.errors import run_cli

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.sample", description=__doc__)
    parser.add_argument("checkpoint", help="a ckpt_<step>.pt file, or a run directory (its newest checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 samples greedily (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=200,
                        help="sample among the k likeliest tokens; 0 for all (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: the smallest set of tokens whose probability reaches p; 1 for all "
                             "(default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to print (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        parser.error("--max-new-tokens, --temperature and --top-k must be >= 0, --num-samples >= 1")
    if not 0.0 < args.top_p <= 1.0:
        parser.error("--top-p must be in (0, 1]")
    return run_cli(lambda: print_samples(args))


def print_samples(args: argparse.Namespace) -> None:
    import torch

    from gptfast.device import resolve_device
    from gptfast.inference import autocast, load_model
    from gptfast.tokenizer import get_tokenizer

    device = resolve_device(args.device)
    model, state, dtype = load_model(args.checkpoint, device)
    print(f"checkpoint: {state['path']} (step {state['step']})", file=sys.stderr)
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(args.prompt) if args.prompt else [enc.eot_token]
    prompt = prompt[-model.config.block_size:]  # a long prompt keeps its end
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt], device=device)
    for i in range(args.num_samples):
        with autocast(device, dtype):
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                                 generator=generator)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(enc.decode(out[0].tolist()[0 if args.prompt else 1:]))


if __name__ == "__main__":
    sys.exit(main())
