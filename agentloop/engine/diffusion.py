"""DiffusionEngine: DiffusionGemma's block-diffusion loop, in process, with the canvas
constraint inside every denoising step and a KV cache that lives as long as a session.

One call (``generate``) does, per canvas:

1. encode the session's new tokens into its cache (causal encoder, once per token ever);
2. start the canvas from uniform noise, with the positions the grammar forces already written;
3. denoise: decoder forward over the cached prefix -> tempered logits -> (constraint) ->
   entropy-bound acceptance -> renoise, until the argmax canvas is stable and confident;
4. cut the canvas at the stop token; without one, commit it and continue in a new canvas.

The loop follows transformers' ``DiffusionGemmaGenerationMixin.generate`` step for step
(see ``sampling.py``); ``sampler="reference"`` reproduces its canvases exactly.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import anyio
import anyio.from_thread
import anyio.to_thread
import torch

from ..errors import ContextLengthError, EngineInputError, GrammarMismatchError, NoValidCanvasError
from ..grammar import CompiledGrammar
from ..grammar.pruning import PruningSchedule
from ..grammar.vocabulary import backend_tokenizer, encode_text
from .generation import CallCost, Draft, Generation, GenerationOptions
from .models import diffusion_gemma_config, load_model, random_model
from .sampling import StableAndConfident, entropy_bound_accept, fused_draw, reference_draw, renoise, temperature_at
from .session import Session

#: Stop tokens of DiffusionGemma's protocol; the ones a tokenizer has become the default stop ids.
DEFAULT_STOP_TOKENS = ("<eos>", "<|tool_response>", "<turn|>")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise EngineInputError(f"dtype {d!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[d]


class _Clock:
    """Per-call time split; synchronises the device so GPU time lands where it was spent."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.spent = {"encoder": 0.0, "decoder": 0.0, "constraint": 0.0, "sampler": 0.0}

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.spent[part] += time.perf_counter() - t


class DiffusionEngine:
    """An in-process DiffusionGemma with grammar-constrained denoising and session caches.

    ``model`` is a ``DiffusionGemmaForBlockDiffusion``; ``tokenizer`` a ``tokenizers.Tokenizer``
    or a transformers tokenizer. One engine serves many sessions: calls queue on a lock, so
    nothing interleaves inside a forward.

    >>> import anyio
    >>> from agentloop.engine import DiffusionEngine, GenerationOptions
    >>> engine = DiffusionEngine.random(canvas_length=32)
    >>> session = engine.session("<|turn>user\\nHello<turn|>\\n<|turn>model\\n")
    >>> out = anyio.run(lambda: engine.generate(session, options=GenerationOptions(seed=0, max_new_tokens=32)))
    >>> out.cost.canvases, out.cost.denoising_steps > 0
    (1, True)
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, compile: bool = False,
                 stop_tokens: Sequence[str] = DEFAULT_STOP_TOKENS,
                 options: GenerationOptions | None = None) -> None:
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=_dtype(dtype) if dtype is not None else None)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options or GenerationOptions()
        cfg = model.config
        self.canvas_length: int = int(cfg.canvas_length)
        self.vocab_size: int = int(cfg.text_config.vocab_size)
        self.max_context: int = int(cfg.text_config.max_position_embeddings)
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        n_tok = _tokenizer_size(self.tokenizer)
        if n_tok > self.vocab_size:
            raise EngineInputError(f"the tokenizer has {n_tok} tokens but the model's vocabulary only "
                                   f"{self.vocab_size}: they do not belong together")
        self.stop_ids: list[int] = [i for i in (_token_id(self.tokenizer, t) for t in stop_tokens) if i is not None]
        self._decoder_forward: Callable[..., Any] = model.forward
        if compile:
            self._decoder_forward = torch.compile(model.forward, dynamic=True)
        self._lock = threading.Lock()

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: Any = None, device: str = "cpu",
                        dtype: str | torch.dtype = "float32", compile: bool = False,
                        options: GenerationOptions | None = None) -> "DiffusionEngine":
        """Load a checkpoint folder (config.json, *.safetensors, tokenizer.json) from disk."""
        model = load_model(path, dtype=_dtype(dtype), device=device)
        if tokenizer is None:
            tokenizer = _load_tokenizer(Path(path))
        return cls(model, tokenizer, compile=compile, options=options)

    @classmethod
    def random(cls, tokenizer: Any = None, *, preset: str = "tiny", canvas_length: int = 256, seed: int = 0,
               device: str = "cpu", dtype: str | torch.dtype = "float32", max_position_embeddings: int = 4096,
               compile: bool = False, options: GenerationOptions | None = None,
               **config_overrides: Any) -> "DiffusionEngine":
        """An engine over a DiffusionGemma with random weights (tests, speed measurements).

        The default tokenizer is the grammar package's byte-level tokenizer with the Gemma 4
        protocol's special tokens.
        """
        if tokenizer is None:
            from ..grammar import byte_tokenizer

            tokenizer = byte_tokenizer()
        vocab = config_overrides.pop("vocab_size", _tokenizer_size(tokenizer))  # a model may pad past it
        ids = {name: _token_id(tokenizer, tok) for name, tok in (("pad", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"))}
        cfg = diffusion_gemma_config(vocab, preset=preset, canvas_length=canvas_length,
                                     max_position_embeddings=max_position_embeddings,
                                     pad_token_id=ids["pad"] if ids["pad"] is not None else 0,
                                     eos_token_id=ids["eos"] if ids["eos"] is not None else 1,
                                     bos_token_id=ids["bos"] if ids["bos"] is not None else 2, **config_overrides)
        model = random_model(cfg, seed=seed, dtype=_dtype(dtype), device=device)
        return cls(model, tokenizer, compile=compile, options=options)

    # ---- tokenizer -----------------------------------------------------------------------
    def encode(self, text: str, *, literal: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS). Special tokens written in it become the control
        tokens, unless ``literal`` (user and tool text): then they are spelled as plain text."""
        return encode_text(self.tokenizer, text, literal=literal)

    def decode(self, ids: Sequence[int]) -> str:
        return str(backend_tokenizer(self.tokenizer).decode(list(ids), skip_special_tokens=False))

    def session(self, prompt: str | Sequence[int] = ()) -> Session:
        """A new conversation, starting from ``prompt`` (text or token ids)."""
        s = Session(self)
        if isinstance(prompt, str):
            s.append_text(prompt)
        else:
            s.append(list(prompt))
        return s

    # ---- calls ---------------------------------------------------------------------------
    async def generate(self, session: Session, constraint: CompiledGrammar | None = None, *,
                       options: GenerationOptions | None = None,
                       on_draft: Callable[[Draft], None] | None = None) -> Generation:
        """Denoise the next output of ``session`` in a worker thread; see ``generate_sync``.

        Cancelling the awaiting task stops the call at the next denoising step and leaves no
        thread running; the session keeps its history as it was before the call.
        """
        fn = partial(self._generate, session, constraint, options, on_draft, anyio.from_thread.check_cancelled)
        return await anyio.to_thread.run_sync(fn)

    def generate_sync(self, session: Session, constraint: CompiledGrammar | None = None, *,
                      options: GenerationOptions | None = None,
                      on_draft: Callable[[Draft], None] | None = None) -> Generation:
        """Encode the session's new tokens, denoise canvases until a stop token, and append
        the output to the session.

        With ``constraint`` every canvas is a path of the grammar: the output is always
        accepted by it, and ``Generation.parsed`` holds its parse.
        """
        return self._generate(session, constraint, options, on_draft, None)

    def _generate(self, session: Session, constraint: CompiledGrammar | None, options: GenerationOptions | None,
                  on_draft: Callable[[Draft], None] | None, check_cancelled: Callable[[], None] | None) -> Generation:
        opts = options or self.options
        if session.engine is not self:
            raise EngineInputError("this session belongs to another engine")
        if constraint is not None:
            self._check_constraint(constraint)
            if opts.sampler == "reference":
                raise EngineInputError("sampler='reference' reproduces the library's unconstrained loop; "
                                       "use sampler='fast' with a constraint")
        with self._locked(check_cancelled), session._lock, torch.inference_mode():
            return self._run(session, constraint, opts, on_draft, check_cancelled)

    @contextmanager
    def _locked(self, check_cancelled: Callable[[], None] | None) -> Iterator[None]:
        # Poll so that a cancelled caller stops waiting for its turn too.
        while not self._lock.acquire(timeout=0.02):
            if check_cancelled is not None:
                check_cancelled()
        try:
            yield
        finally:
            self._lock.release()

    def canvas_logits(self, session: Session, canvas: Sequence[int]) -> torch.Tensor:
        """Raw logits (L, V) float32 of one decoder forward over ``canvas`` after the
        session's history, without self-conditioning. Encodes pending tokens first.

        For inspection and tests (e.g. that an incremental cache equals a fresh one).
        """
        if len(canvas) != self.canvas_length:
            raise EngineInputError(f"a canvas has {self.canvas_length} tokens, got {len(canvas)}")
        if not session._tokens:
            raise EngineInputError("the session is empty: append the prompt (at least one token) first")
        with self._locked(None), session._lock, torch.inference_mode():
            self._encode_pending(session, _Clock(self.device))
            ids = torch.tensor([list(canvas)], device=self.device)  # (1, L)
            pos = torch.arange(session._cached, session._cached + self.canvas_length, device=self.device)[None]
            out = self.model(decoder_input_ids=ids, cache=session._cache, decoder_position_ids=pos)
            return out.logits[0].float().cpu()

    def _check_constraint(self, g: CompiledGrammar) -> None:
        n = _tokenizer_size(self.tokenizer)
        if g.vocab.size != n:
            raise GrammarMismatchError(f"the constraint was compiled for a tokenizer of {g.vocab.size} tokens, this "
                                       f"engine's has {n}: compile it with engine.tokenizer")
        for name, i in g.vocab.special_ids.items():
            own = _token_id(self.tokenizer, name)
            if own is not None and own != i:
                raise GrammarMismatchError(f"the constraint spells {name!r} as token {i}, this engine's tokenizer as "
                                           f"{own}: compile it with engine.tokenizer")

    def _run(self, session: Session, g: CompiledGrammar | None, opts: GenerationOptions,
             on_draft: Callable[[Draft], None] | None, check_cancelled: Callable[[], None] | None) -> Generation:
        t_start = time.perf_counter()
        L = self.canvas_length
        if not session._tokens:
            raise EngineInputError("the session is empty: append the prompt (at least one token) before generating")
        room = (self.max_context - len(session._tokens)) // L
        if room < 1:
            raise ContextLengthError(
                f"the session holds {len(session._tokens)} tokens; one more canvas of {L} needs "
                f"{len(session._tokens) + L} positions but the model has {self.max_context}. Start a new session "
                "or shorten the history (e.g. summarise older turns) and re-encode it")
        n_canvases = min(math.ceil(opts.max_new_tokens / L), room)
        stop_ids = set(self.stop_ids if opts.stop_ids is None else opts.stop_ids)
        seed = opts.seed if opts.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        gen_cpu = torch.Generator().manual_seed(seed)
        gen_dev = gen_cpu if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed)
        clock = _Clock(self.device)
        start_len = len(session._tokens)
        prefill = steps = forced_count = 0
        state = g.start_state if g is not None else -1
        out: list[int] = []
        canvases: list[list[int]] = []
        stop: int | None = None
        try:
            for c in range(n_canvases):
                prefill += self._encode_pending(session, clock)
                last = c == n_canvases - 1
                partial_ok = g is not None and not last
                canvas, n_steps, forced = self._denoise_canvas(session, g, state, partial_ok, opts, gen_cpu,
                                                                 gen_dev, clock, c, on_draft, check_cancelled)
                steps += n_steps
                canvases.append(canvas)
                with clock("constraint" if g is not None else "sampler"):
                    end, state = self._stop_position(canvas, g, state, stop_ids)
                written = canvas if end is None else canvas[:end]
                forced_count += sum(1 for t in forced[: L if end is None else end + 1] if t >= 0)
                out.extend(written)
                session._tokens.extend(written)
                if end is not None:
                    stop = canvas[end]
                    break
        except BaseException:
            # Nothing of a call that did not finish stays: drop its tokens, and the cache if
            # it already encoded some of them (a DynamicCache with sliding layers cannot be cropped).
            del session._tokens[start_len:]
            if session._cached > start_len:
                session._cache, session._cached = None, 0
            raise
        parsed = None
        if g is not None and stop is not None:
            with clock("constraint"):
                parsed = g.parse(out + [stop])
        sp = clock.spent
        cost = CallCost(prefill_tokens=prefill, canvases=len(canvases), denoising_steps=steps,
                        forced_tokens=forced_count, generated_tokens=len(out) + (stop is not None),
                        encoder_s=sp["encoder"], decoder_s=sp["decoder"], constraint_s=sp["constraint"],
                        sampler_s=sp["sampler"], total_s=time.perf_counter() - t_start)
        return Generation(tokens=out, text=self.decode(out), stop_token=stop, cost=cost, parsed=parsed,
                          canvases=canvases)

    def _stop_position(self, canvas: list[int], g: CompiledGrammar | None, state: int,
                       stop_ids: set[int]) -> tuple[int | None, int]:
        """Where the canvas's stop token is (None: it continues in the next canvas), and the
        grammar's state after what the call keeps of it (one walk serves both)."""
        if g is None:
            return next((i for i, t in enumerate(canvas) if t in stop_ids), None), state
        # The grammar knows where its stop token is (a stop id inside a string would not be one).
        q = state
        for i, t in enumerate(canvas):
            q = g.automaton.step(q, t)
            if g.is_complete(q):
                return i, q
        return None, q

    def _encode_pending(self, session: Session, clock: _Clock) -> int:
        """Run the causal encoder over the session's tokens not in its cache yet."""
        new = session._tokens[session._cached:]
        if not new:
            return 0
        from transformers import DynamicCache

        if session._cache is None:
            session._cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, n)
        pos = torch.arange(session._cached, session._cached + len(new), device=self.device)[None]  # (1, n)
        try:
            with clock("encoder"):
                self.model.model.encoder(input_ids=ids, cache=session._cache, position_ids=pos)
        except BaseException:
            # Some layers may hold the new keys and values already: the cache is unusable.
            session._cache, session._cached = None, 0
            raise
        session._cached += len(new)
        return len(new)

    def _denoise_canvas(self, session: Session, g: CompiledGrammar | None, state: int, partial_ok: bool,
                        opts: GenerationOptions, gen_cpu: torch.Generator, gen_dev: torch.Generator, clock: _Clock,
                        canvas_index: int, on_draft: Callable[[Draft], None] | None,
                        check_cancelled: Callable[[], None] | None) -> tuple[list[int], int, list[int]]:
        """One canvas: returns its final (argmax) tokens, the denoising steps it took, and per
        position the token the grammar forced there (-1: free)."""
        L, V, N = self.canvas_length, self.vocab_size, opts.max_denoising_steps
        positions = torch.arange(session._cached, session._cached + L, device=self.device)[None]  # (1, L)
        # 2. Start from uniform noise (drawn first, as the library does) ...
        canvas = torch.randint(0, V, (1, L), generator=gen_dev, device=self.device)  # (1, L)
        # ... with what the grammar forces written in: the text every sentence continues with
        # (one spelling of it; the DP then runs on the rest of the canvas from the state after
        # it), and the positions where one token only is possible.
        k, q_k, forced_t, forced = 0, state, None, [-1] * L
        if g is not None:
            with clock("constraint"):
                prefix = g.forced_prefix(state, limit=L)
                q_k = g.state_after(prefix, state)
                try:
                    rest = g.forced_tokens(L - len(prefix), q_k, partial_ok)
                except NoValidCanvasError:  # the prefix spelling leaves no room: let the DP choose all
                    prefix, q_k = [], state
                    rest = g.forced_tokens(L, state, partial_ok)
                k = len(prefix)
                forced = prefix + rest
            forced_t = torch.tensor(forced, device=self.device)[None]  # (1, L), -1 where free
            canvas = torch.where(forced_t >= 0, forced_t, canvas)
            if min(forced) >= 0:
                return forced, 0, forced  # nothing left to denoise
            # the self-conditioning buffer: one-hot log-probs on the forced prefix, and the
            # constrained marginals of the rest, written there by each step's DP
            cond = torch.full((1, L, V), -math.inf, device=self.device)  # (1, L, V)
            # the DP writes there where the vocabulary passes run (the logits' CUDA device,
            # or the host); elsewhere (MPS) its marginals are copied in
            in_place = self.device.type in ("cpu", "cuda")
            if k:
                cond[0, torch.arange(k), torch.tensor(prefix)] = 0.0
        argmax = canvas
        self_cond: torch.Tensor | None = None
        stopper = StableAndConfident(opts.stability_threshold, opts.confidence_threshold)
        pruning = PruningSchedule()  # (per canvas: its steps' logits look alike)
        steps = 0
        for cur_step in reversed(range(1, N + 1)):  # counts the steps remaining, as the library's schedule does
            if check_cancelled is not None:
                check_cancelled()
            steps += 1
            # 3a. Decoder forward over the cached prefix and the current canvas.
            with clock("decoder"):
                logits = self._decoder_forward(decoder_input_ids=canvas, cache=session._cache,
                                               self_conditioning_logits=self_cond,
                                               decoder_position_ids=positions).logits  # (1, L, V) float32
            temperature = temperature_at(cur_step, N, opts.t_min, opts.t_max)
            # 3b. Denoiser sample, argmax canvas and per-position entropy.
            if g is not None:
                with clock("sampler"):
                    logits.div_(temperature)
                with clock("constraint"):
                    # the DP over the free part of the canvas, from the state after the forced text
                    prune = pruning.try_now()
                    step = g.denoise_step(logits[0, k:], gen_cpu, state=q_k, partial=partial_ok,
                                          out=cond[0, k:] if in_place else None, prune=prune)
                    if prune:
                        pruning.record(step.pruned)
                    if not in_place:
                        cond[0, k:] = step.log_marginals.to(self.device)
                    sample = torch.tensor(prefix + step.sample, device=self.device)[None]  # (1, L)
                    argmax = torch.tensor(prefix + step.argmax, device=self.device)[None]  # (1, L)
                    entropy = torch.nn.functional.pad(step.entropy, (k, 0))[None]  # (1, L) float64, 0 where forced
                    next_cond = cond
            else:
                with clock("sampler"):
                    if opts.sampler == "reference":
                        tempered = logits / temperature
                        sample, argmax, entropy = reference_draw(tempered, gen_dev)
                        next_cond = tempered
                    else:
                        sample, argmax, entropy = fused_draw(logits, temperature, gen_dev)
                        sample, argmax = sample.to(self.device), argmax.to(self.device)
                        next_cond = logits  # tempered in place
            with clock("sampler"):
                # 3c. Entropy-bound acceptance, then renoise what was not accepted.
                accepted = entropy_bound_accept(entropy, opts.entropy_bound).to(self.device)
                canvas = renoise(torch.where(accepted, sample, canvas), accepted, V, gen_dev)
                if forced_t is not None:
                    canvas = torch.where(forced_t >= 0, forced_t, canvas)
                done = not opts.fixed_steps and stopper(argmax, entropy)
            if on_draft is not None:
                on_draft(Draft(canvas_index, steps, argmax[0].tolist()))
            if done:
                break
            # 3d. This step's (constrained) distribution conditions the next one.
            self_cond = next_cond.to(self.dtype)
        return argmax[0].tolist(), steps, forced


def _tokenizer_size(tokenizer: Any) -> int:
    return int(backend_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True))


def _token_id(tokenizer: Any, token: str) -> int | None:
    i = backend_tokenizer(tokenizer).token_to_id(token)
    return None if i is None else int(i)


def _load_tokenizer(path: Path) -> Any:
    f = path / "tokenizer.json"
    if not f.is_file():
        raise EngineInputError(f"{path} has no tokenizer.json; pass tokenizer= explicitly")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f))
