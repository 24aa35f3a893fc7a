"""Text generation with a KV cache: each new token costs one forward pass over that token only.

    ftlm-generate <run dir | checkpoint | export dir> --prompt "대한민국은" [--max-new-tokens 128]
                  [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--device auto]

Text is printed as the tokens come, each piece decoded after the ids before it (StreamDecoder): a byte-level
tokenizer may split one Hangul syllable (three UTF-8 bytes) across tokens, and a SentencePiece-style one writes the
space before a word into the word's token.

An empty prompt starts a new document (the model continues from end-of-text). A prompt longer than the model's
context is cut to its last max_seq_len - 1 tokens (after the BOS of a Llama-style tokenizer), with a warning (all of
it is still printed), so at least one token can follow. --max-new-tokens 0 prints the prompt unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from ftlm.checkpoint import SOURCE_HELP, CheckpointError, load, resolve_device, resolve_dtype
from ftlm.model import KVCache

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator=None,
):
    """Yield new token ids one at a time. temperature 0 is greedy decoding.

    Stops after max_new_tokens, at eos_id (which is yielded), or when the sequence reaches model.max_seq_len.
    Runs the model in eval mode (no dropout) and restores its mode afterwards.
    """
    cfg = model.cfg
    if len(prompt_ids) == 0:
        raise ValueError("generate() needs at least one prompt token (use the end-of-text id to start from nothing)")
    if len(prompt_ids) > cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than model.max_seq_len={cfg.max_seq_len}")
    param = next(model.parameters())
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - ids.shape[1])
    cache = KVCache(cfg, 1, ids.shape[1] + max_new_tokens, param.device, param.dtype) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        step_input = ids
        for _ in range(max_new_tokens):
            logits, _ = model(step_input if use_cache else ids, cache=cache)
            next_id = sample(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            yield int(next_id)
            if eos_id is not None and int(next_id) == eos_id:
                return
            step_input = next_id.view(1, 1)
            if not use_cache:
                ids = torch.cat([ids, step_input], dim=1)
    finally:
        model.train(was_training)


def sample(logits, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already exceeds top_p (the first token always stays)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # a CPU generator for a GPU model: draw on the generator's device (one vocabulary-sized copy)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never printing half a character.

    Each piece is what the new ids add to the text of the ids before them (`context`, the prompt, to begin with),
    decoded together: a SentencePiece-style tokenizer (Llama-2, Mistral) writes a word's leading space as part
    of its token, and drops it when the token is decoded on its own, and a byte-level one may split a Hangul
    syllable (three UTF-8 bytes) across tokens. While the new text ends in U+FFFD (an incomplete UTF-8 sequence)
    it is held back. Each push decodes the ids since the last printed piece and the piece before it, never
    everything generated so far.
    """

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)[-CONTEXT_IDS:]  # the last piece printed (or the prompt), then new ids
        self.printed = len(self.ids)  # ids before this are printed (or were the prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._take(hold=True)

    def flush(self) -> str:
        """Whatever is held back, as is (an incomplete sequence at the very end shows as U+FFFD)."""
        return self._take(hold=False)

    def _take(self, hold: bool) -> str:
        if self.printed == len(self.ids):
            return ""
        before = self._decode(self.ids[: self.printed])
        text = self._decode(self.ids)
        if hold and (text.endswith("\ufffd") or len(text) <= len(before)):
            return ""
        piece = text[len(before) :] if text.startswith(before) else self._decode(self.ids[self.printed :])
        del self.ids[: self.printed]  # what is printed now is the next piece's context
        self.printed = len(self.ids)
        return piece


CONTEXT_IDS = 8  # of the prompt kept as the first piece's context: decoders look at a token's neighbours only


def continuation(tokenizer, prompt_ids: list[int], ids) -> str:
    """The text that `ids` add after the prompt (as ftlm-generate prints it)."""
    stream = StreamDecoder(tokenizer, prompt_ids)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ftlm-generate",
        description="Continue a prompt with a trained model, printing the text as it is generated.",
    )
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy decoding (default 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="sample among the most likely tokens holding this probability mass; 1: all (default 0.95)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: different every run)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--config", help="a model config the checkpoint must match (mismatched keys are named)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0.0 < args.top_p <= 1.0:
        parser.error("--max-new-tokens, --temperature and --top-k must not be negative; --top-p must be in (0, 1]")
    try:
        device = resolve_device(args.device)
        loaded = load(args.source, device=device, dtype=resolve_dtype(args.dtype, device), expected_config=args.config)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"ftlm-generate: error: {e}", file=sys.stderr)
        return 1
    model, tokenizer = loaded.model, loaded.tokenizer

    # An empty prompt starts a new document: the model continues from end-of-text, as after every training document.
    opening = tokenizer.document_start or [tokenizer.eot_id]  # how a training document begins
    prompt_ids = tokenizer.encode_document(args.prompt) if args.prompt else opening
    if not prompt_ids:  # text the tokenizer turns into nothing (it normalises away): a new document too
        prompt_ids = opening
    if args.max_new_tokens == 0:
        log.info("nothing to generate (--max-new-tokens 0): the prompt is printed as given")
        print(args.prompt)
        return 0
    limit = model.cfg.max_seq_len - 1  # room for at least one new token
    if len(prompt_ids) > limit:
        bos = tokenizer.document_start  # a Llama-style BOS stays first: the model never saw text without it
        kept = limit - len(bos)
        log.warning(
            "the prompt has %d tokens; the model sees its last %d%s (model.max_seq_len=%d); all of it is printed",
            len(prompt_ids),
            kept,
            ", after the BOS token" if bos else "",
            model.cfg.max_seq_len,
        )
        prompt_ids = bos + prompt_ids[-kept:]
    if args.max_new_tokens > model.cfg.max_seq_len - len(prompt_ids):
        log.warning(
            "generating at most %d tokens: the model's context is %d tokens",
            model.cfg.max_seq_len - len(prompt_ids),
            model.cfg.max_seq_len,
        )
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = StreamDecoder(tokenizer, prompt_ids)
    start, n = time.perf_counter(), 0
    for token in generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        eos_id=tokenizer.eot_id,
        generator=generator,
    ):
        n += 1
        if token == tokenizer.eot_id:
            break
        piece = stream.push(token)
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    elapsed = time.perf_counter() - start
    log.info("%d tokens in %.2f s (%.1f tokens/s) on %s", n, elapsed, n / max(elapsed, 1e-9), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
