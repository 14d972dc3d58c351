"""generate(): transformers' decoding semantics on our rolling KV cache, kept on the device.

One prefill forward over the (left-padded) prompt computes the logits of the last position
only; then every decode step feeds one token per row. Positions, the repetition-penalty
table, the finished flags and the output buffer live on the model's device, so a decode step
queues work without waiting for it. The host learns whether every row has finished through
_StopCheck, which on CUDA reads the answer of a step a few steps later instead of stalling
the queue (the extra steps only append padding, trimmed at the end). A streamer is the one
exception: it needs every token on the host as it is produced.

Logits processing follows transformers' order: repetition penalty (over the whole sequence,
prompt included, left padding excluded), min_new_tokens (eos masked), then for sampling
temperature, top-k, top-p; finished rows are padded with pad_token_id.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch

from .cache import RollingCache

# transformers' generate() arguments that we accept only at their default (no-op) value.
_UNSUPPORTED_UNLESS_DEFAULT = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "typical_p": 1.0, "min_p": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "force_words_ids": None, "sequence_bias": None, "stop_strings": None, "max_time": None,
    "assistant_model": None, "logits_processor": None, "stopping_criteria": None,
    "prefix_allowed_tokens_fn": None, "generation_config": None, "inputs_embeds": None,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
    "output_attentions": False, "output_hidden_states": False,
}
# transformers' generate() arguments that change nothing here: we always decode with the cache
# (same tokens as without), there is a single device, and beam-only knobs have no beams to act on.
_IGNORED = {"use_cache", "synced_gpus", "token_type_ids", "early_stopping", "length_penalty",
            "renormalize_logits", "remove_invalid_values"}


class TextStreamer:
    """Streamer for generate(): decodes tokens as they come and hands out text once it is complete.

    Follows transformers' streamer protocol (put(token_ids) / end()) for batch size 1. Text is
    released as soon as it does not end in an unfinished UTF-8 sequence (byte-fallback tokens
    can split a character); each decode covers only the last two chunks (a prefix for context,
    so leading spaces come out right), so the cost per token stays flat. The pieces join to
    exactly tokenizer.decode(generated_ids, **decode_kwargs).

    callback(text) receives each piece; without one, pieces are printed to stdout and end()
    prints a newline, like transformers' TextStreamer.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True,
                 callback: Optional[Callable[[str], None]] = None, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.callback = callback
        self.decode_kwargs = decode_kwargs
        self._reset()

    def _reset(self) -> None:
        self.token_ids: List[int] = []
        self.prefix_offset = 0   # token_ids[prefix_offset:read_offset] is context already emitted
        self.read_offset = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)
        if self.callback is None:
            print(flush=True)
        self._reset()

    def _emit(self, final: bool) -> None:
        decode = self.tokenizer.decode
        context = decode(self.token_ids[self.prefix_offset:self.read_offset], **self.decode_kwargs)
        text = decode(self.token_ids[self.prefix_offset:], **self.decode_kwargs)
        if len(text) <= len(context) or (text.endswith("\ufffd") and not final):
            return
        piece = text[len(context):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        if self.callback is None:
            print(piece, end="", flush=True)
        else:
            self.callback(piece)


class _StopCheck:
    """Tells the host whether every row has finished.

    On CPU the answer is immediate. On CUDA each step queues a copy of the flag into pinned
    memory and the host reads the copy queued `lag` steps earlier: the device queue never runs
    dry, and the host never runs more than `lag` steps ahead of it.
    """

    def __init__(self, device: torch.device, lag: int):
        self.lag = lag if device.type == "cuda" else 0
        self.calls = 0
        if self.lag:
            self.flags = [torch.zeros((), dtype=torch.bool).pin_memory() for _ in range(self.lag + 1)]
            self.events = [torch.cuda.Event() for _ in range(self.lag + 1)]

    def __call__(self, unfinished: torch.Tensor) -> bool:
        if not self.lag:
            return not bool(unfinished.any())
        slot = self.calls % (self.lag + 1)
        self.flags[slot].copy_(~unfinished.any(), non_blocking=True)
        self.events[slot].record()
        self.calls += 1
        if self.calls <= self.lag:
            return False
        oldest = self.calls % (self.lag + 1)
        self.events[oldest].synchronize()
        return bool(self.flags[oldest])


class _DecodeStep:
    """One decode step: logits [batch, vocab] for tokens [batch, 1] at positions [batch, 1].

    With use_cuda_graph the first call runs eagerly on a side stream (which also warms up cuBLAS
    and the allocator), then captures the step into a CUDA graph; later calls copy their inputs
    into the captured ones and replay it: one launch per token instead of several hundred, so the
    host no longer paces the GPU. This is sound because nothing in a decode step depends on host
    state that changes from step to step: the cache is sized for the whole generation before the
    loop, positions and cache lengths live on the device, and the kernels' launch shapes depend on
    the cache capacity only. The logits returned are overwritten by the next call.
    """

    def __init__(self, model, cache: RollingCache, use_cuda_graph: bool):
        self.model, self.cache, self.use_cuda_graph = model, cache, use_cuda_graph
        self.graph = None

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, position_ids=positions, past_key_values=self.cache, use_cache=True,
                          logits_to_keep=1, _trusted_input_ids=True).logits[:, -1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self._forward(tokens, positions)
        if self.graph is not None:
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            self.graph.replay()
            self.cache.seen_tokens += 1   # the host-side count that replaying does not run
            return self.logits
        self.tokens, self.positions = tokens.clone(), positions.clone()
        device = tokens.device                # the model's, which need not be the current device
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            logits = self._forward(self.tokens, self.positions)
        caller.wait_stream(side)
        buffers = [t.data_ptr() for t in self.cache.key_cache + self.cache.value_cache]
        seen_tokens = self.cache.seen_tokens
        graph = torch.cuda.CUDAGraph()
        try:  # captured on the stream that ran the eager step, whose cuBLAS workspace now exists
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.logits = self._forward(self.tokens, self.positions)  # recorded, not run
        except Exception as error:
            torch.cuda.set_stream(caller)     # a failed capture_end leaves the capture stream current
            if isinstance(error, torch.OutOfMemoryError):
                raise
            raise RuntimeError("generate(use_cuda_graph=True): capturing the decode step failed "
                               f"({error}); use_cuda_graph=False runs it eagerly") from error
        finally:
            self.cache.seen_tokens = seen_tokens  # the capture counted a step that did not run
        if [t.data_ptr() for t in self.cache.key_cache + self.cache.value_cache] != buffers:
            raise RuntimeError("generate(use_cuda_graph=True): the KV cache was reallocated while the decode "
                               "step was captured; it must be sized for the whole generation first")
        self.graph = graph
        return logits


@contextlib.contextmanager
def _explain_out_of_memory(batch: int, prompt_length: int, max_new_tokens: int, device: torch.device):
    """Re-raises an out-of-memory error with what generate() was asked to hold. Whatever the
    failed call allocated is released as the exception unwinds, so the process stays usable."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(
            f"generate() ran out of memory on {device} with {batch} rows of {prompt_length} prompt + "
            f"{max_new_tokens} new tokens; use fewer rows or tokens. {error}") from error


def _apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits shrink towards -inf."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def _apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """transformers' TopKLogitsWarper: keep the top_k highest logits (ties at the k-th included)."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def _apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: keep the smallest set of tokens with probability >= top_p."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


def _token_list(value, name: str) -> List[int]:
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return ids


@dataclass
class _TokenPicker:
    """transformers' logits processors, in its order, then argmax or a draw.

    seen [batch, vocab + 1] marks the tokens of each row so far (prompt included, left padding
    excluded; the extra column absorbs ids that are not tokens) for the repetition penalty.
    """
    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: float
    repetition_penalty: float
    min_new_tokens: int
    eos: torch.Tensor                    # long [n_eos] on the device
    generator: Optional[torch.Generator]
    seen: Optional[torch.Tensor] = None

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        scores = logits.float()
        vocab_size = scores.shape[-1]
        if self.seen is not None:
            scores = _apply_repetition_penalty(scores, self.seen[:, :vocab_size], self.repetition_penalty)
        if step < self.min_new_tokens and len(self.eos):
            scores = scores.index_fill(1, self.eos, -float("inf"))
        if not self.do_sample:
            return scores.argmax(dim=-1)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            scores = _apply_top_k(scores, self.top_k)
        if self.top_p < 1.0:
            scores = _apply_top_p(scores, self.top_p)
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator).squeeze(1)

    def note(self, tokens: torch.Tensor) -> None:
        """Records tokens [batch, n] as seen (for the repetition penalty)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)


def _prepare_prompt(input_ids, attention_mask, pad_token_id: int, eos_ids: List[int], bos_token_id,
                    device: torch.device):
    """Checks the prompt and returns (input_ids, attention_mask) as long tensors on `device`."""
    if input_ids is None:
        if bos_token_id is None:
            raise ValueError("generate() needs input_ids (the model has no bos_token_id to start from)")
        input_ids = torch.tensor([[bos_token_id]])
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape [batch, prompt_length], got "
                         + (f"{input_ids.dtype} {list(input_ids.shape)}"
                            if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"generate() needs a non-empty prompt, got input_ids of shape {list(input_ids.shape)}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        # transformers' inference: padding is recognizable only when pad differs from eos.
        if pad_token_id in eos_ids or not bool((input_ids == pad_token_id).any()):
            attention_mask = torch.ones_like(input_ids)
        else:
            attention_mask = (input_ids != pad_token_id).long()
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids "
                         f"{list(input_ids.shape)}: they must match")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    empty_row, right_padded = torch.stack([(attention_mask.sum(dim=1) == 0).any(),
                                           (attention_mask[:, -1] == 0).any()]).tolist()
    if empty_row:
        raise ValueError("a row of the prompt is empty (its attention_mask is all zeros)")
    if right_padded:
        raise ValueError("generate() needs left padding: a row's attention_mask ends with 0 "
                         "(pad on the left, e.g. tokenizer(..., padding_side='left'))")
    return input_ids, attention_mask


class GenerationMixin:
    """generate() for causal LMs whose forward takes (input_ids, attention_mask, position_ids,
    past_key_values, use_cache, logits_to_keep, _trusted_input_ids) and returns .logits and
    .past_key_values (a RollingCache)."""

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: Optional[int] = None,
        max_length: Optional[int] = None,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: Optional[Union[int, List[int]]] = None,
        pad_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        streamer=None,
        num_return_sequences: int = 1,
        tokenizer=None,
        use_cuda_graph: bool = False,
        prefill_chunk_size: int = 4096,
        **kwargs,
    ) -> torch.LongTensor:
        """Generates continuations of input_ids [batch, prompt] (left-padded, with attention_mask).

        Returns the prompt followed by the generated tokens, [batch, prompt + generated], like
        transformers. Rows that finish (eos; a list of ids is accepted, [] disables it; default
        config.eos_token_id) are padded with pad_token_id (default config.pad_token_id, else the
        first eos id); generation stops when every row has finished or after max_new_tokens
        (default 20; max_length counts the prompt instead). do_sample=False is greedy; sampling
        applies temperature, top_k (0 disables it) and top_p and draws with `generator` (or a
        fresh one seeded with `seed`; neither: torch's global generator). streamer: an object
        with put()/end() (transformers' protocol) or a callable receiving text, which needs
        tokenizer=. max_new_tokens=0 returns the prompt. use_cuda_graph (CUDA only): replay the
        decode step as a CUDA graph (same tokens, fewer launches). prefill_chunk_size: the prompt
        runs through the model this many tokens at a time (bounds activation memory; exact).
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        for name, default in _UNSUPPORTED_UNLESS_DEFAULT.items():
            value = kwargs.pop(name, default)
            if value is not None and value != default:
                raise NotImplementedError(f"generate({name}={value!r}) is not supported")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise ValueError(f"generate() got arguments it does not use: {', '.join(unknown)}")

        config, device = self.config, self.device
        if eos_token_id is None:
            eos_token_id = [] if config.eos_token_id is None else config.eos_token_id
        eos_ids = _token_list(eos_token_id, "eos_token_id")
        if any(not 0 <= i < config.vocab_size for i in eos_ids):
            raise ValueError(f"eos_token_id {eos_ids} outside the vocabulary [0, {config.vocab_size})")
        if pad_token_id is None:
            pad_token_id = config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0
        input_ids, attention_mask = _prepare_prompt(input_ids, attention_mask, pad_token_id, eos_ids,
                                                    config.bos_token_id, device)

        prompt_length = input_ids.shape[1]
        if max_new_tokens is None:
            if max_length is None:
                max_new_tokens = 20
            else:
                max_new_tokens = max_length - prompt_length
                if max_new_tokens <= 0:
                    raise ValueError(f"the prompt has {prompt_length} tokens but max_length is {max_length}: "
                                     "increase max_length or set max_new_tokens")
        for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("min_new_tokens", min_new_tokens, 0),
                                 ("num_return_sequences", num_return_sequences, 1),
                                 ("prefill_chunk_size", prefill_chunk_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if do_sample:
            if temperature is None or temperature <= 0:
                raise ValueError(f"temperature must be > 0 for sampling, got {temperature} "
                                 "(use do_sample=False for greedy decoding)")
            if top_k is not None and top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {top_k}")
            if top_p is None or not 0 <= top_p <= 1:
                raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        elif num_return_sequences > 1:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")
        if use_cuda_graph and self.base_model.kernel_backend != "kernels":
            raise ValueError("use_cuda_graph=True needs the 'kernels' backend (the reference ops wait for the "
                             "device, which a graph capture forbids): set_kernel_backend('kernels')")
        if use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device, it is on {device}")
        if streamer is not None and not hasattr(streamer, "put"):
            if not callable(streamer):
                raise TypeError("streamer must have put()/end() or be a callable receiving text")
            if tokenizer is None:
                raise ValueError("a text callback as streamer needs the tokenizer: generate(..., tokenizer=tok)")
            streamer = TextStreamer(tokenizer, skip_prompt=True, callback=streamer, skip_special_tokens=True)
        if max_new_tokens == 0:
            return input_ids

        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        if do_sample and generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        batch = input_ids.shape[0]
        picker = _TokenPicker(do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens,
                              torch.tensor(eos_ids, dtype=torch.long, device=device), generator)
        if repetition_penalty != 1.0:
            # Prompt tokens count, left padding does not (transformers' prompt_ignore_length).
            first_real = attention_mask.ne(0).int().argmax(dim=1, keepdim=True)
            padding = torch.arange(prompt_length, device=device) < first_real
            picker.seen = torch.zeros(batch, config.vocab_size + 1, dtype=torch.bool, device=device)
            picker.note(input_ids.clamp(max=config.vocab_size).masked_fill(padding, config.vocab_size))

        # On CUDA the model's device is made current: streams and events below belong to it.
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with _explain_out_of_memory(batch, prompt_length, max_new_tokens, device), on_device:
            output = input_ids.new_full((batch, prompt_length + max_new_tokens), pad_token_id)
            output[:, :prompt_length] = input_ids
            if streamer is not None:
                streamer.put(input_ids.cpu())
            # The cache is sized for the whole generation at once (capped at the window): no regrowth
            # mid-loop. The prompt runs in chunks: activation memory stays bounded, the result exact.
            cache = RollingCache(config, max_length=prompt_length + max_new_tokens)
            for start in range(0, prompt_length, prefill_chunk_size):
                end = min(start + prefill_chunk_size, prompt_length)
                logits = self(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                              past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

            unfinished = torch.ones(batch, dtype=torch.bool, device=device)
            generated = torch.zeros(batch, dtype=torch.long, device=device)   # per row, eos included
            positions = attention_mask.sum(dim=1, keepdim=True)                # of the next token, per row
            stop_check = _StopCheck(device, lag=0 if streamer is not None else 4)
            decode_step = _DecodeStep(self, cache, use_cuda_graph)
            for step in range(max_new_tokens):
                next_tokens = picker(logits, step)
                generated += unfinished
                output[:, prompt_length + step] = torch.where(unfinished, next_tokens, pad_token_id)
                if streamer is not None:
                    streamer.put(output[:, prompt_length + step].cpu())
                if eos_ids:
                    unfinished &= ~torch.isin(next_tokens, picker.eos)
                if step + 1 == max_new_tokens or (eos_ids and stop_check(unfinished)):
                    break
                picker.note(next_tokens[:, None])
                # Finished rows keep feeding their own (in-vocabulary) draws; their outputs are padding.
                logits = decode_step(next_tokens[:, None], positions)
                positions = positions + 1

            if streamer is not None:
                streamer.end()
            return output[:, :prompt_length + int(generated.max())]
