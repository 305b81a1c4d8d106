"""`vilex eval`: image -> tokens -> image on held-out inputs, measured, per backend.

    vilex eval CKPT [--backend torch,onnxruntime=engines/toy,triton=127.0.0.1:8000] [--tokens 1,4,16,all]
                    [--n 200] [--images DIR] [--out DIR]

1. references: `n` held-out toy scenes (split "heldout", never trained on) with their ground truth, or the
   images of a folder (--images; then PSNR and SSIM only)
2. per backend, the main table at `steps` steps with the checkpoint's scheduler:
   - ViLex reconstructions at each token count
   - baselines: the caption alone through the same text encoder (toy scenes, or name.txt sidecars),
     unconditional generation, and random tokens at the scale of the trained ones
   - an edit: all ViLex tokens + a color word with text-free guidance; the probe says whether the main
     object took that color while its shape and position stayed (toy scenes)
   - with `words`, per text: all ViLex tokens + that same text for every image, with the edit's text-free
     guidance, measured against the input as a reconstruction is (what other words beside the tokens keep)
   Probe agreement is the share of images where the probe reads the same class from the reconstruction as
   from the input; position error is the probe's centre of the main object against the true centre.
3. the trade-off a deploying user picks from: fidelity and batch-1 latency over steps x schedulers x token
   counts, on `sweep_n` of the scenes
4. results.json, results.md, grid.png (rows: scenes; columns: input, then each condition) and tradeoff.png

Every image of every condition starts from the same noise (a generator seeded with `seed` per image), so
the rows differ only in their conditioning: differences between rows are paired, not noise.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .. import settings
from ..errors import ViLexUsageError, check_range
from . import metrics

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}
LOCAL_BACKENDS = ("torch", "onnxruntime", "tensorrt")
GRID_ROWS = 6
DEFAULT_SWEEP_N = 32


@dataclass
class EvalConfig:
    checkpoint: str
    out: str
    backends: list[str] = field(default_factory=lambda: ["torch"])  # NAME or NAME=ENGINES|URL
    tokens: list[str] = field(default_factory=lambda: ["1", "4", "16", "all"])
    n: int = 200
    images: str | None = None  # a folder of images instead of toy scenes
    probe: str | None = None  # the attribute probe; default: the shipped one, for toy checkpoints
    steps: int = settings.DEFAULT_STEPS
    guidance: float = settings.DEFAULT_GUIDANCE
    edit_guidance: float = settings.DEFAULT_GUIDANCE  # text-free guidance weight of the edit and words rows
    words: list[str] = field(default_factory=list)  # a row per text: all tokens + the text (--words)
    sweep_steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    sweep_schedulers: list[str] = field(default_factory=lambda: ["ddim", "dpm++"])
    sweep_guidance: list[float] | None = None  # classifier-free guidance scales of the sweep; None: [guidance]
    sweep_n: int | None = None  # 0 turns the sweep off; None: min(DEFAULT_SWEEP_N, n)
    baselines: bool = True  # False: the ViLex rows only (deployment comparisons, pooler comparisons)
    batch_size: int = 50
    seed: int = 0
    protocol: str = "http"


# ---- references ----------------------------------------------------------------------------------------
@dataclass
class References:
    images: list[PIL.Image.Image]
    pixels: np.ndarray  # (n, H, W, 3) in [0, 1]
    captions: list[str] | None
    scenes: list | None = None  # toy scenes: ground truth for the probe


def toy_references(n: int) -> References:
    from ..toyworld.scenes import SPLITS, make_scenes, render_all

    scenes = make_scenes(n, SPLITS["heldout"])
    pixels = render_all(scenes)
    return References([PIL.Image.fromarray(p) for p in pixels], pixels.astype(np.float32) / 255.0,
                      [s.caption for s in scenes], scenes)


def folder_references(folder: str, n: int, size: int, log=print) -> References:
    """The first n readable images of a folder (recursive), as `vilex train` reads them: an unreadable file
    is skipped and listed, not fatal. The caption baseline needs a `name.txt` caption for every image; when
    only some have one, it is left out and the log says so."""
    from ..errors import ImageInputError
    from ..images import load_image
    from ..training.data import crop_square, find_images, read_caption

    images, captions, skipped = [], [], []
    for record in find_images(folder):
        if len(images) == n:
            break
        try:
            images.append(crop_square(load_image(record.path), size))
        except ImageInputError as error:
            skipped.append(f"{record.path}: {error}")
            continue
        captions.append(read_caption(record))
    for line in skipped:
        log(f"skipped unreadable {line}")
    if not images:
        raise ViLexUsageError(f"--images '{folder}' holds no readable image ({len(skipped)} unreadable)")
    captioned = sum(c is not None for c in captions)
    if 0 < captioned < len(captions):
        log(f"caption baseline left out: {captioned} of {len(captions)} images have a name.txt caption, and the "
            f"baseline compares all of them (give every image a caption, or none)")
    return References(images, np.stack([np.asarray(i) for i in images]).astype(np.float32) / 255.0,
                      captions if captioned == len(captions) else None)


# ---- how a backend makes images ---------------------------------------------------------------------
class LocalRunner:
    """The pipeline in this process, its stages on torch, onnxruntime or tensorrt."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.original_scheduler = pipeline.scheduler
        self.sweeps = True  # schedulers can be swapped in this process

    def set_scheduler(self, name: str | None) -> None:
        import diffusers

        if name is None:
            self.pipeline.scheduler = self.original_scheduler
        else:
            self.pipeline.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(self.original_scheduler.config)

    def tokenize(self, images) -> torch.Tensor:
        return self.pipeline.tokenize(images)

    def generate(self, vilex_tokens, prompts, steps, guidance, seed, text_guidance=None) -> np.ndarray:
        n = len(prompts) if vilex_tokens is None else vilex_tokens.shape[0]
        generators = [torch.Generator().manual_seed(seed) for _ in range(n)]
        images = self.pipeline.generate(vilex_tokens, prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                                        text_guidance_scale=text_guidance, generator=generators, output_type="np",
                                        progress=False).images
        return np.round(images * 255) / 255  # quantized as a PNG (and as Triton's uint8) would be


class TritonRunner:
    """Whole requests to a running `vilex serve`: one request per image (reconstruct: raw RGB pixels, and words
    for the edit; generate: tokens), from `workers` client threads so the server can batch them; the server's own
    scheduler. It serves ViLex tokens, so text-only rows (the caption, unconditional) are not made here."""

    def __init__(self, url: str, protocol: str, workers: int = 4):
        self.url, self.protocol, self.workers = url, protocol, workers
        self.sweeps = False  # the server keeps its scheduler

    def _each(self, request, items) -> np.ndarray:
        from ..serving.client import map_concurrently

        return np.stack(map_concurrently(self.url, self.protocol, request, list(items), self.workers)) / 255.0

    def reconstruct(self, images, k, steps, guidance, seed, prompts=None, text_guidance=None) -> np.ndarray:
        prompts = [None] * len(images) if prompts is None else prompts
        return self._each(lambda client, item: client.reconstruct(
            [item[0]], num_tokens=k, prompt=item[1], steps=steps, guidance=guidance, seed=seed,
            text_guidance=text_guidance)[0], zip(images, prompts))

    def generate(self, vilex_tokens, prompts, steps, guidance, seed, text_guidance=None) -> np.ndarray:
        """As LocalRunner.generate, for ViLex tokens (with or without words): the server takes tokens."""
        prompts = [None] * len(vilex_tokens) if prompts is None else prompts
        return self._each(lambda client, item: client.generate(
            item[0][None].numpy(), prompt=item[1], steps=steps, guidance=guidance, seed=seed,
            text_guidance=text_guidance)[0], zip(vilex_tokens, prompts))


def parse_backend(spec: str) -> tuple[str, str | None]:
    name, _, where = spec.partition("=")
    if name not in LOCAL_BACKENDS + ("triton",):
        raise ViLexUsageError(f"--backend must be NAME or NAME=WHERE with NAME one of torch, onnxruntime, tensorrt, "
                              f"triton; got {spec!r}")
    if name in ("onnxruntime", "tensorrt", "triton") and not where:
        what = "an export folder (onnxruntime=engines/NAME)" if name != "triton" else "HOST:PORT (triton=127.0.0.1:8000)"
        raise ViLexUsageError(f"--backend {name} needs {what}")
    return name, where or None


def parse_tokens(values: list[str], num_queries: int) -> list[int]:
    counts = []
    for value in values:
        if value == "all":
            counts.append(num_queries)
            continue
        try:
            k = int(value)
        except ValueError:
            raise ViLexUsageError(f"--tokens takes counts 1..{num_queries} or 'all', got {value!r}") from None
        check_range("--tokens", k, 1, num_queries)
        counts.append(k)
    return list(dict.fromkeys(counts))


# ---- measuring -----------------------------------------------------------------------------------------
class Measure:
    """Turns a condition's images into its row of figures."""

    def __init__(self, references: References, probe):
        self.references = references
        self.probe = probe
        if references.scenes is not None:
            from ..toyworld.probe import targets_of
            from ..toyworld.scenes import object_mask

            self.targets = targets_of(references.scenes)
            # Agreement is with what the probe reads from the input itself, so the probe's own errors (an
            # object on a cell border, a radius next to the small/large threshold) are not counted against
            # the reconstruction; the probe's accuracy on the inputs is reported next to it.
            self.input_reads = probe.read(metrics.to_tensor(references.pixels)) if probe is not None else None
            self.masks = np.stack([object_mask(s.main) for s in references.scenes])
            self.colors = np.array([s.main.rgb for s in references.scenes], dtype=np.float64)

    def __call__(self, images: np.ndarray, index: np.ndarray, edit_colors: np.ndarray | None = None) -> dict:
        reference = self.references.pixels[index]
        row = {"psnr": metrics.summarize(metrics.psnr(images, reference)),
               "ssim": metrics.summarize(metrics.ssim(images, reference))}
        if self.probe is None or self.references.scenes is None:
            return row
        from ..toyworld.probe import ATTRIBUTES

        read = self.probe.read(metrics.to_tensor(images))
        agreement = {}
        for name in ATTRIBUTES:
            if edit_colors is not None and name == "color":
                continue  # the edit asks for another color
            agreement[name] = metrics.summarize((read[name] == self.input_reads[name][index]).float().numpy())
        row["probe_agreement"] = agreement
        row["position_error_px"] = metrics.summarize(
            (read["center"] - self.targets["center"][index]).norm(dim=-1).numpy())
        if edit_colors is None:
            row["color_error"] = metrics.summarize(metrics.color_error(images, self.masks[index], self.colors[index]))
        else:
            row["edit_color_hit"] = metrics.summarize((read["color"].numpy() == edit_colors).astype(np.float64))
        return row


def edit_targets(scenes, seed: int) -> tuple[list[str], np.ndarray]:
    """Per scene a color word that is neither the main object's color nor the background's."""
    from ..toyworld.scenes import COLOR_NAMES

    rng = np.random.default_rng([seed, 7])
    words = []
    for scene in scenes:
        allowed = [c for c in COLOR_NAMES if c not in (scene.main.color, scene.background_color)]
        words.append(allowed[rng.integers(len(allowed))])
    return words, np.array([COLOR_NAMES.index(w) for w in words])


def paired_psnr(images: np.ndarray, others: np.ndarray) -> dict:
    """PSNR between two backends' reconstructions of the same inputs: pixel-identical pairs (infinite PSNR)
    are counted, the others summarized."""
    values = metrics.psnr(images, others)
    identical = ~np.isfinite(values)
    return {"identical": int(identical.sum()), "of": len(values),
            "psnr": metrics.summarize(values[~identical]) if (~identical).any() else None}


def _paired_figure(value: dict) -> str:
    figure = _figure(value["psnr"]) + " dB" if value["psnr"] else "all"
    return f"{figure} ({value['identical']} of {value['of']} identical)" if value["identical"] else figure


def _batched(function, count: int, batch_size: int) -> np.ndarray:
    return np.concatenate([function(np.arange(i, min(i + batch_size, count))) for i in range(0, count, batch_size)])


def _latency_ms(function) -> float:
    """Median wall time of a batch-1 call, over 3 calls after one warm-up."""
    function()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


class Evaluation:
    """pipeline: an already loaded pipeline of config.checkpoint (the demo passes its own)."""

    def __init__(self, config: EvalConfig, pipeline=None, log=print):
        from ..runtime import load_pipeline

        self.config = config
        check_range("--n", config.n, 1, 100_000)
        settings.check_steps(config.steps, "--steps")
        settings.check_guidance(config.guidance, "--guidance")
        settings.check_text_guidance(config.edit_guidance, "--edit-guidance")
        for steps in config.sweep_steps:
            settings.check_steps(steps, "--sweep-steps")
        if config.sweep_guidance is None:  # as before the option: the main table's guidance
            config.sweep_guidance = [config.guidance]
        if not config.sweep_guidance:
            raise ViLexUsageError("--sweep-guidance takes at least one guidance scale, got none")
        config.sweep_guidance = [settings.check_guidance(g, "--sweep-guidance") for g in config.sweep_guidance]
        check_range("--batch-size", config.batch_size, 1, 4096)
        for name in config.sweep_schedulers:
            if name not in SCHEDULERS:
                raise ViLexUsageError(f"--sweep-schedulers takes {', '.join(SCHEDULERS)}, got {name!r}")
        if config.sweep_n is not None:
            check_range("--sweep-n", config.sweep_n, 0, config.n)  # before loading anything
        self.specs = [parse_backend(s) for s in config.backends]
        self.pipeline = pipeline or load_pipeline(config.checkpoint)
        self.token_counts = parse_tokens(config.tokens, self.pipeline.num_queries)
        self.words_tokens = [self._words_room(text) for text in config.words]  # before any image is read
        if config.images:
            self.references = folder_references(config.images, config.n, self.pipeline.default_size, log)
        else:
            self.references = toy_references(config.n)
        available = len(self.references.images)
        if config.sweep_n is None:  # a default that depends on --n (and the folder) follows it
            config.sweep_n = min(DEFAULT_SWEEP_N, available)
        check_range("--sweep-n", config.sweep_n, 0, available)
        self.probe = self._load_probe()
        self.measure = Measure(self.references, self.probe)
        self.rows: list[dict] = []
        self.grid_columns: dict[str, np.ndarray] = {}
        # With several backends: the first one's images per condition, which every later backend's images of
        # the same condition are compared with (PSNR between the two reconstructions: what a precision or a
        # server changes, free of how far both are from the input).
        self.first_backend: dict[str, np.ndarray] = {}

    def _load_probe(self):
        if self.references.scenes is None:
            return None
        from ..toyworld.probe import load_probe
        from ..toyworld.shipped import probe_path

        return load_probe(self.config.probe or probe_path())

    def runner(self, name: str, where: str | None):
        if name == "triton":
            return TritonRunner(where, self.config.protocol)
        if name == "torch":
            from ..backends import TorchBackend

            return LocalRunner(self.pipeline.set_backend(TorchBackend(self.pipeline)))
        from ..runtime import open_pipeline

        # The export folder alone, checked to come from this checkpoint (no second copy of the weights).
        return LocalRunner(open_pipeline(self.config.checkpoint, name, engines=where))

    def tokens_beside(self, texts) -> int:
        """All tokens, or the longest prefix that fits beside the longest of `texts` (75-token checkpoints)."""
        return min([self.pipeline.num_queries] + [self.pipeline.prompt_builder.max_vilex_tokens(t) for t in texts])

    def _words_room(self, text: str) -> int:
        """`tokens_beside` a --words text; one that is empty or leaves no room for one token is a usage error."""
        if not isinstance(text, str) or not text.strip():
            raise ViLexUsageError(f"--words takes a text to put beside the tokens, got {text!r}")
        k = self.tokens_beside([text])
        if k < 1:
            raise ViLexUsageError(f"--words {text!r} leaves no room for a ViLex token beside it (the text encoder "
                                  f"has {self.pipeline.prompt_builder.max_length - 2} places); give a shorter text")
        return k

    # ---- 2. the main table -----------------------------------------------------------------------------
    def conditions(self, runner, count: int):
        """(name, tokens, make images for an index array, edit colors or None) per row this runner can make."""
        c, refs = self.config, self.references
        served = isinstance(runner, TritonRunner)

        def beside(k: int, texts, text_guidance):
            """Images of all (or the first k) tokens of each image + its text (a list per image)."""
            def make(i):
                prompts = [texts[j] for j in i]
                if served:  # whole reconstruct requests: the server makes the tokens
                    return runner.reconstruct([refs.images[j] for j in i], k, c.steps, c.guidance, c.seed,
                                              prompts=prompts, text_guidance=text_guidance)
                return runner.generate(tokens[i, :k], prompts, c.steps, c.guidance, c.seed,
                                       text_guidance=text_guidance)
            return make

        tokens = None
        if not served:
            tokens = torch.cat([runner.tokenize([refs.images[j] for j in i])
                                for i in np.array_split(np.arange(count), max(1, count // c.batch_size))])
            self._tokens = tokens
        for k in self.token_counts:
            yield f"vilex-{k}", k, beside(k, [None] * count, None), None
        if c.baselines:
            yield from self.baseline_conditions(runner, count, served, beside)
        for text, k in zip(c.words, self.words_tokens):
            yield f"vilex + {text!r}", k, beside(k, [text] * count, c.edit_guidance), None

    def baseline_conditions(self, runner, count: int, served: bool, beside):
        """The caption alone and unconditional generation (local backends), random tokens, and the edit (toy
        scenes)."""
        c, refs = self.config, self.references
        if not served:
            if refs.captions is not None:
                yield "caption", 0, lambda i: runner.generate(None, [refs.captions[j] for j in i], c.steps,
                                                              c.guidance, c.seed), None
            yield "unconditional", 0, lambda i: runner.generate(None, [""] * len(i), c.steps, 1.0, c.seed), None
        vilex_config = self.pipeline.vilex.config
        generator = torch.Generator().manual_seed(c.seed + 1)
        random_tokens = torch.randn((count, vilex_config.num_queries, vilex_config.output_dim),
                                    generator=generator) * float(vilex_config.token_scale)
        yield "random-tokens", vilex_config.num_queries, lambda i: runner.generate(random_tokens[i], None, c.steps,
                                                                                   c.guidance, c.seed), None
        if refs.scenes is not None:
            words, colors = edit_targets(refs.scenes, c.seed)
            k = self.tokens_beside(set(words))
            yield "edit: vilex + color word", k, beside(k, words, c.edit_guidance), colors

    def run_backend(self, name: str, where: str | None, log) -> None:
        runner = self.runner(name, where)
        count = len(self.references.images)
        first = not self.grid_columns
        if isinstance(runner, TritonRunner) and self.config.baselines:
            log(f"{name}={where}: the caption and unconditional rows are left out (the server takes ViLex tokens; "
                f"text alone is the base's, measured on the local backends)")
        for condition, k, make, edit_colors in self.conditions(runner, count):
            start = time.perf_counter()
            images = _batched(make, count, self.config.batch_size)
            seconds = time.perf_counter() - start
            index = np.arange(count)
            row = {"backend": name if where is None else f"{name}={where}", "condition": condition, "tokens": k,
                   "steps": self.config.steps, "scheduler": "checkpoint", "guidance": self.config.guidance,
                   "seconds_per_image": seconds / count,
                   **self.measure(images, index, None if edit_colors is None else edit_colors[index])}
            if len(self.specs) > 1 and first:
                self.first_backend[condition] = images
            elif condition in self.first_backend:
                row["psnr_vs_first_backend"] = paired_psnr(images, self.first_backend[condition])
            self.rows.append(row)
            log(format_row(row))
            if first:
                self.grid_columns[condition] = images[:GRID_ROWS]
        if runner.sweeps and self.config.sweep_n:
            self.sweep(runner, name if where is None else f"{name}={where}", log)

    # ---- 3. the trade-off --------------------------------------------------------------------------------
    def sweep(self, runner: LocalRunner, backend: str, log) -> None:
        c = self.config
        index = np.arange(c.sweep_n)
        try:
            for scheduler in c.sweep_schedulers:
                runner.set_scheduler(scheduler)
                for guidance, steps, k in itertools.product(c.sweep_guidance, c.sweep_steps, self.token_counts):
                    tokens = self._tokens[:, :k]
                    images = _batched(lambda i: runner.generate(tokens[i], None, steps, guidance, c.seed),
                                      c.sweep_n, c.batch_size)
                    latency = _latency_ms(lambda: runner.generate(tokens[:1], None, steps, guidance, c.seed))
                    row = {"backend": backend, "condition": f"vilex-{k}", "tokens": k, "steps": steps,
                           "scheduler": scheduler, "guidance": guidance, "latency_ms_batch1": latency,
                           "sweep": True, **self.measure(images, index)}
                    self.rows.append(row)
                    log(format_row(row) + (f"  guidance {guidance:g}" if len(c.sweep_guidance) > 1 else ""))
        finally:
            runner.set_scheduler(None)

    # ---- 4. outputs ------------------------------------------------------------------------------------
    def run(self, log=print) -> dict:
        for name, where in self.specs:
            log(f"backend {name}{'=' + where if where else ''}: {len(self.references.images)} images, "
                f"{self.config.steps} steps, guidance {self.config.guidance}")
            self.run_backend(name, where, log)
        return {"config": asdict(self.config), "checkpoint": self.config.checkpoint,
                "probe_on_inputs": self._probe_on_inputs(), "rows": self.rows}

    def _probe_on_inputs(self) -> dict | None:
        if self.probe is None:
            return None
        from ..toyworld.probe import accuracy

        return accuracy(self.probe, metrics.to_tensor(self.references.pixels), self.measure.targets)

    def grid(self) -> PIL.Image.Image:
        from ..images import make_grid

        names = list(self.grid_columns)
        rows = []
        for r in range(min(GRID_ROWS, len(self.references.images))):
            rows.append([self.references.images[r]] + [
                PIL.Image.fromarray(np.round(self.grid_columns[n][r] * 255).astype(np.uint8)) for n in names])
        return make_grid(rows, labels=["input"] + names, scale=2)


# ---- text ------------------------------------------------------------------------------------------------
def _figure(value: dict | None, digits: int = 2) -> str:
    if not value:
        return "-"
    return f"{value['mean']:.{digits}f} ± {value['ci95']:.{digits}f}"


def format_row(row: dict) -> str:
    parts = [f"{row['backend']:<12} {row['condition']:<26} steps {row['steps']:>2} {row['scheduler']:<10}",
             f"PSNR {_figure(row['psnr'])}", f"SSIM {_figure(row['ssim'], 3)}"]
    if "probe_agreement" in row:
        parts.append("agree " + " ".join(f"{k} {v['mean']:.2f}" for k, v in row["probe_agreement"].items()))
        parts.append(f"pos err {_figure(row['position_error_px'], 1)} px")
    if "edit_color_hit" in row:
        parts.append(f"edit color hit {row['edit_color_hit']['mean']:.2f}")
    if "psnr_vs_first_backend" in row:
        parts.append(f"PSNR vs first backend {_paired_figure(row['psnr_vs_first_backend'])}")
    if "latency_ms_batch1" in row:
        parts.append(f"{row['latency_ms_batch1']:.0f} ms/image at batch 1")
    return "  ".join(parts)


def markdown(result: dict) -> str:
    from ..toyworld.probe import ATTRIBUTES

    rows = [r for r in result["rows"] if not r.get("sweep")]
    toy = any("probe_agreement" in r for r in rows)
    header = ["backend", "condition", "PSNR dB", "SSIM"]
    if toy:
        header += [f"agree {a}" for a in ATTRIBUTES] + ["position error px", "color error", "edit color hit"]
    versus = any("psnr_vs_first_backend" in r for r in rows)
    if versus:
        header.append("PSNR vs the first backend")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r["backend"], r["condition"], _figure(r["psnr"]), _figure(r["ssim"], 3)]
        if toy:
            agreement = r.get("probe_agreement", {})
            cells += [f"{agreement[a]['mean']:.2f}" if a in agreement else "-" for a in ATTRIBUTES]
            cells += [_figure(r.get("position_error_px"), 1), _figure(r.get("color_error"), 1),
                      f"{r['edit_color_hit']['mean']:.2f}" if "edit_color_hit" in r else "-"]
        if versus:
            cells.append(_paired_figure(r["psnr_vs_first_backend"]) if "psnr_vs_first_backend" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    c = result["config"]
    text = [f"# vilex eval {result['checkpoint']}", "",
            f"{rows[0]['psnr']['n'] if rows else 0} held-out images, {c['steps']} steps, guidance {c['guidance']}, "
            f"the checkpoint's scheduler; mean ± 95% confidence half-width. Agreement: the probe reads the same "
            f"class from the reconstruction as from the input; position error: the probe's centre of the main "
            f"object against the true one; color error: RGB distance (0..255) of the main object's interior.",
            "", *lines]
    if result.get("probe_on_inputs"):
        p = result["probe_on_inputs"]
        text += ["", "Probe accuracy on the inputs against the generator's ground truth: " +
                 ", ".join(f"{k} {v:.3f}" for k, v in p.items())]
    sweep = [r for r in result["rows"] if r.get("sweep")]
    if sweep:
        text += ["", f"## Trade-off ({c['sweep_n']} images; latency: one image, batch 1)", "",
                 "| backend | scheduler | guidance | steps | tokens | PSNR dB | position error px | latency ms |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sweep:
            text.append(f"| {r['backend']} | {r['scheduler']} | {r['guidance']:g} | {r['steps']} | {r['tokens']} | "
                        f"{_figure(r['psnr'])} | {_figure(r.get('position_error_px'), 1)} | "
                        f"{r['latency_ms_batch1']:.0f} |")
    return "\n".join(text) + "\n"


def tradeoff_plot(result: dict, path: Path) -> bool:
    sweep = [r for r in result["rows"] if r.get("sweep")]
    if not sweep:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.5))
    several = len({r["guidance"] for r in sweep}) > 1
    for key in dict.fromkeys((r["backend"], r["scheduler"], r["tokens"], r["guidance"]) for r in sweep):
        points = sorted((r["latency_ms_batch1"], r["psnr"]["mean"], r["steps"]) for r in sweep
                        if (r["backend"], r["scheduler"], r["tokens"], r["guidance"]) == key)
        label = f"{key[0]} {key[1]} {key[2]} tok" + (f" g {key[3]:g}" if several else "")
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for latency, value, steps in points:
            axis.annotate(str(steps), (latency, value), fontsize=7)
    axis.set_xlabel("latency per image, batch 1 (ms)")
    axis.set_ylabel("PSNR (dB)")
    axis.set_title("fidelity vs latency (labels: denoising steps)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def run_eval(config: EvalConfig, log=print) -> dict:
    from ..outputs import atomic_folder

    evaluation = Evaluation(config, log=log)
    result = evaluation.run(log)
    with atomic_folder(config.out) as staging:
        (staging / "results.json").write_text(json.dumps(result, indent=1))
        (staging / "results.md").write_text(markdown(result))
        evaluation.grid().save(staging / "grid.png")
        tradeoff_plot(result, staging / "tradeoff.png")
    return result
