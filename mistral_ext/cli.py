"""`mistral-ext` command line: generate, chat, convert, bench, info.

Without --model the embedded SmolLM2-135M-Instruct GGUF is used. Errors (a bad path, an
unreadable or corrupt file, bad input) end with one line on stderr and exit status 1;
--traceback shows the full traceback instead.
"""
import argparse
import sys
import time
from typing import List, Optional

import torch

from . import bench, convert, cuda_kernels_available
from .config import MistralConfig
from .generation import TextStreamer
from .loading import default_model_path, open_checkpoint
from .modeling import MistralForCausalLM
from .tokenizer import MistralTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint directory or file (.gguf, .safetensors, ...); "
                             "default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")


def _in_range(kind, low, high=None):
    """argparse type: `kind` in [low, high], so that bad values fail before the model loads."""
    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is not in [{low}, {'inf' if high is None else high}]")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=_in_range(int, 0), default=256, metavar="N")
    parser.add_argument("--temperature", type=_in_range(float, 0.0), default=0.0,
                        help="sampling temperature; 0 (the default) decodes greedily")
    parser.add_argument("--top-p", type=_in_range(float, 0.0, 1.0), default=1.0)
    parser.add_argument("--top-k", type=_in_range(int, 0), default=50, help="0 disables top-k filtering")
    parser.add_argument("--seed", type=int, help="seed of the sampler (reproducible output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-ext", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    generate.add_argument("prompt", nargs="?", help="the prompt (read from stdin when absent)")
    generate.add_argument("--chat", action="store_true",
                          help="wrap the prompt in the model's chat template as a user message")
    _add_model_arguments(generate)
    _add_sampling_arguments(generate)
    generate.set_defaults(func=run_generate)

    chat = commands.add_parser("chat", help="interactive chat on stdin (/exit or end of input quits)")
    chat.add_argument("--system", help="system message opening the conversation")
    _add_model_arguments(chat)
    _add_sampling_arguments(chat)
    chat.set_defaults(func=run_chat)

    convert_parser = commands.add_parser("convert", help="convert a checkpoint to our format")
    convert.add_arguments(convert_parser)
    convert_parser.set_defaults(func=convert.run)

    bench_parser = commands.add_parser("bench", help="measure prefill and decode speed")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.run)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("path", nargs="?", help="checkpoint (default: the embedded model)")
    info.set_defaults(func=run_info)
    return parser


class Session:
    """A loaded model and tokenizer with the sampling options of the command line."""

    def __init__(self, args: argparse.Namespace):
        path = args.model or default_model_path()
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[args.dtype]
        self.tokenizer = MistralTokenizer.from_pretrained(path)
        self.model = MistralForCausalLM.from_pretrained(path, dtype=dtype, device=device).eval()
        self.device = device
        self.args = args
        eos = self.model.config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_id = sorted(set(eos))

    def chat_ids(self, messages: List[dict]) -> List[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def generate(self, ids: List[int], write) -> List[int]:
        """Streams the continuation of `ids` through write(text), ends it with a newline, prints
        prefill and decode speed on stderr and returns the new token ids."""
        if not ids:
            raise ValueError("the prompt is empty")
        args = self.args
        timer = _TimedStreamer(TextStreamer(self.tokenizer, callback=write, skip_special_tokens=True))
        input_ids = torch.tensor([ids], device=self.device)
        output = self.model.generate(
            input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, eos_token_id=self.eos_token_id, streamer=timer)
        write("\n")
        print(timer.summary(len(ids)), file=sys.stderr, flush=True)
        return output[0, len(ids):].tolist()


class _TimedStreamer:
    """Passes tokens on to a streamer and notes when each step's tokens arrived: the first
    generated token marks the end of the prefill, the rest time the decode loop."""

    def __init__(self, streamer):
        self.streamer = streamer
        self.times: List[float] = []

    def put(self, token_ids: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.streamer.put(token_ids)

    def end(self) -> None:
        self.streamer.end()

    def summary(self, prompt_tokens: int) -> str:
        if len(self.times) < 2:
            return "no tokens generated"
        prefill = self.times[1] - self.times[0]
        text = f"prefill: {prompt_tokens} tokens, {prompt_tokens / prefill:.1f} tokens/s"
        decoded = len(self.times) - 2
        if decoded:
            text += f"; decode: {decoded} tokens, {decoded / (self.times[-1] - self.times[1]):.1f} tokens/s"
        return text


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no prompt: give it as an argument or pipe it on stdin")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"stdin is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else _read_stdin()
    session = Session(args)
    if args.chat:
        ids = session.chat_ids([{"role": "user", "content": prompt}])
    else:
        ids = session.tokenizer.encode(prompt)
    session.generate(ids, _write_stdout)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    session = Session(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = session.generate(session.chat_ids(messages), _write_stdout)
        messages.append({"role": "assistant",
                         "content": session.tokenizer.decode(answer, skip_special_tokens=True)})


def run_info(args: argparse.Namespace) -> int:
    """Reads the checkpoint's headers only; the parameters are counted on a meta-device model."""
    checkpoint = open_checkpoint(args.path or default_model_path())
    config = MistralConfig.from_dict(checkpoint.config)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in MistralForCausalLM(config).parameters())
    print(f"path: {checkpoint.path}")
    print(f"parameters: {parameters:,}")
    print(f"dtype: {str(checkpoint.stored_dtype()).removeprefix('torch.')}")
    print(f"CUDA kernels: {'loaded' if cuda_kernels_available() else 'not built'} "
          f"(GPU {'available' if torch.cuda.is_available() else 'not available'})")
    print(f"config: {config.to_json_string()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        return status if isinstance(status, int) else 0   # bench.run returns its figures
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # noqa: BLE001 - the command line reports, it does not crash
        if args.traceback:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mistral-ext {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
