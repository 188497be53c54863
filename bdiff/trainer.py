"""Training loop: data → standardise → ε, log C → field matching with Adam and EMA."""
import contextlib
import copy
import dataclasses
import functools
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from bdiff.adam import Adam
from bdiff.backend import check_device, check_memory, check_seed
from bdiff.checkpoint import optimizer_state, read_checkpoint, save_checkpoint, split_state
from bdiff.data import (POWER_PROBE_ROWS, PixelCoding, PowerCoding, Standardizer, coding_from_dict,
                        discrete_columns, fingerprint, is_image, scale_set_by_far_rows,
                        tail_set_columns)
from bdiff.density import clearly_better, flow_base, reliable, select_eps, select_flow_eps
from bdiff.errors import BdiffError
from bdiff.fields import MAX_FOURIER, PARAMS, FieldModel, resolve_param
from bdiff.losses import (EPS_RULES, GRAD_LOSSES, LEVEL_SAMPLINGS, ValidationSet, bandwidth,
                          cluster_balanced_weights, data_clusters, field_loss, heldout_bandwidth,
                          heldout_row_logliks, log_normaliser, noise_levels, split_validation)
from bdiff.model import TrainedModel
from bdiff.sampler import choose_end_level, support_floor


VAL_TOLERANCE = 0.01  # a fall of the validation loss below this share of its fall so far is no progress
SMALL_DATA_ROWS, SMALL_BATCH, BATCH, WIDTH = 1000, 128, 1024, 256
STEPS, IMAGE_STEPS = 3000, 6000  # image data: digits FD 5.5 at 3000 steps, 4.9 at 6000 (NOTES.md)
MAX_WIDTH, MAX_DEPTH = 16384, 64
# random Fourier features of the input: this many frequencies, up to FOURIER_REACH / sqrt(ε)
# radians per standardised unit (detail down to half p_ε's own kernel width)
FOURIER_FEATURES, FOURIER_REACH = 32, 2.0
# ... for tables of up to this many columns: spectral bias is a low-dimensional ill (Tancik et
# al. 2020), and from 5-D up the features measured worse (mixture10d held-out log-likelihood
# -14.97 with, -14.66 without; diabetes 21.0 / 25.2; NOTES.md)
FOURIER_MAX_DIM = 4
# 1-D and 2-D tables with noise levels: networks half as wide on half the batch (from
# SMALL_DATA_ROWS rows), with FOURIER_FEATURES per column. A 2-D fit of 10 000 rows costs a third
# as much and sampling half; on the suite's six 1-D/2-D sets the held-out likelihood, C2ST and
# far share held. The features keep the checkerboard's edges (far share 0.36 % at width 128 with
# 32 features, 0.08 % with 64); in 1-D, 64 left the scalar field's normaliser at 1.36 (1.05 with
# 32). From 4-D the narrow networks sampled worse (iris C2ST 0.63 -> 0.70, mixture10d mode-weight
# error 0.011 -> 0.022), so wider data keeps the wide ones (NOTES.md).
LOW_DIM, LOW_DIM_WIDTH, LOW_DIM_BATCH = 2, 128, 512
# fewer validation rows than this are too noisy to stop training on (diabetes, 35 rows: two
# seeds of four stopped at 1000-1100 steps, held-out log-likelihood 21.5 against 25.6-26.1 at
# 3000; NOTES.md); they still choose ε and the density
MIN_STOPPING_ROWS = 100
# nor may it stop before the queries have drawn on each training row this many times on average:
# the validation loss follows the large modes, and on 50 000 rows of two random 2-D mixtures it
# stopped at 1500-1700 steps with their 2 % modes still too wide (far share 0.34-0.40 % under
# SMC; 0.15-0.20 % trained to 3000 steps); the best weights are then chosen from there on, as the
# loss had not seen the gain. Up to ~25 000 2-D rows its stops come later anyway.
MIN_QUERY_PASSES = 30
PREPARE_NOTICE_ROWS = 100_000  # from here the ε search and log C take long enough to announce
# options a resumed run takes from now; every other option is the stored run's
RESUME_OPTIONS = ("steps", "checkpoint_every", "device", "backend")


@dataclass
class FitConfig:
    steps: int = None            # a cap: training stops earlier when the validation loss stalls;
    #                              None: STEPS, or IMAGE_STEPS for image data
    batch_size: int = None       # queries per step; None: BATCH (LOW_DIM_BATCH for 1-D and 2-D
    #                              tables), or SMALL_BATCH for data sets under SMALL_DATA_ROWS rows
    #                              (same held-out likelihood there, 3-4x faster; NOTES.md)
    lr: float = 2e-3
    width: int = None            # hidden width; None: WIDTH, or LOW_DIM_WIDTH for 1-D and 2-D tables
    depth: int = 3
    arch: str = "auto"           # "shared" trunk or "separate" networks; auto: separate with
    #                              noise levels (digits FD 4.5-5.4 against 5.5-8.7 shared)
    param: str = "auto"          # "linear" (s, g) or "log" (log s, ∇log s); auto: log, in every D
    #                              (docs/design.md §2: one family measured best on low-D data too)
    grad_loss: str = "direct"
    id_weight: float = 1.0
    eps: float = None            # None: from `eps_rule` on the standardised data
    eps_rule: str = "auto"       # "silverman", "scott", or "heldout": best held-out likelihood
    #                              of p_ε; auto: heldout (Silverman oversmooths multimodal data)
    eps_max: float = None        # noise levels up to eps_max for the annealed sampler; None: auto
    #                              (log fields: twice the data's total variance), 0: none
    level_sampling: str = "auto"  # training levels: "log-uniform" in ε or EDM's "log-normal"; auto:
    #                              log-normal for image data (digits FD 5.5 -> 3.6), log-uniform
    #                              otherwise (log-normal worse on 2-D manifolds and tables; NOTES.md)
    eps_floor: float = None      # lowest noise level, where the annealed sampler ends (below the
    #                              density's ε: samples without p_ε's blur); None: 1e-4 or ε if smaller
    query_mix: tuple = (0.5, 0.3, 0.2)  # data, perturbed data, broad Gaussian
    perturb_scale: float = 2.0   # perturbed queries: data + N(0, (perturb_scale² ε) I)
    broad_std: float = 1.5       # broad queries: N(0, broad_std² I), covering the sampler's start
    power: str = "auto"          # tables: Yeo-Johnson powers for skewed columns (PowerCoding); "on"
    #                              wherever a column's fitted power is not near 1, with tail powers
    #                              for heavy tails, "off", or "auto": powers alone, where a kernel
    #                              density predicts held-out rows clearly better with them (engel
    #                              -13.79 -> -13.61, tips -5.05 -> -4.83; NOTES.md)
    pixel_logit: bool = True     # image data: model logit-coded pixels, dequantised when integer
    #                              (samples stay on the data's grid and in its range; NOTES.md)
    wide_share: float = 0.0      # level models: share of queries at 4 sqrt(ε) from the rows: it pins
    #                              the gaps between rows; measured on one data set only, so off by
    #                              default (NOTES.md)
    fourier: int = None          # random Fourier features of the input (frequencies up to
    #                              FOURIER_REACH / sqrt(ε)); 0: the plain input; None: FOURIER_FEATURES
    #                              for tables of up to FOURIER_MAX_DIM columns with noise levels
    #                              (FOURIER_FEATURES per column up to LOW_DIM columns)
    #                              (sharp edges and thin supports: spiral
    #                              held-out log-likelihood -1.86 -> -1.28, far samples 0.38 % -> 0.03 %),
    #                              else 0 (digits FD 3.9 -> 4.0 with 64, not better; NOTES.md)
    query_balance: float = 0.0   # level models: query rows drawn ∝ (their cluster's share)^-this;
    #                              0: uniform (1 lifted a 5-D mixture's 2 % mode but cost the small
    #                              tables' likelihood, diabetes 25.6 -> 22.6; NOTES.md)
    max_refs: int = 4096         # references per step: all data up to this, else a random subset
    #                              (the targets stay unbiased; see NOTES.md for the measured trade)
    ema: float = 0.999
    seed: int = 0
    device: str = "cpu"
    backend: str = None
    checkpoint_every: int = 500
    val_fraction: float = 0.1    # rows kept out of the references to judge the fit (early stopping)
    eval_every: int = 100        # steps between validation losses
    patience: int = 5            # validations without a VAL_TOLERANCE gain before training stops; 0: never

    def validate(self):
        if (self.steps is not None and self.steps < 1) or (self.batch_size is not None and self.batch_size < 2):
            raise BdiffError("--steps must be >= 1 and --batch-size >= 2")
        for name, value, most in (("width", self.width, MAX_WIDTH), ("depth", self.depth, MAX_DEPTH)):
            if value is not None and not 1 <= value <= most:
                raise BdiffError(f"--{name} must be between 1 and {most}, got {value}")
        check_seed(self.seed)
        if self.checkpoint_every < 1:
            raise BdiffError("--checkpoint-every must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BdiffError(f"--lr must be a positive number, got {self.lr}")
        if self.grad_loss not in GRAD_LOSSES:
            raise BdiffError(f"unknown gradient loss {self.grad_loss!r}; choose {', '.join(GRAD_LOSSES)}")
        if self.eps_rule not in EPS_RULES:
            raise BdiffError(f"unknown ε rule {self.eps_rule!r}; choose {', '.join(EPS_RULES)}")
        if self.param not in ("auto",) + PARAMS:
            raise BdiffError(f"unknown --param {self.param!r}; choose auto, {', '.join(PARAMS)}")
        if self.level_sampling not in ("auto",) + LEVEL_SAMPLINGS:
            raise BdiffError(f"unknown --level-sampling {self.level_sampling!r}; choose auto, "
                             f"{', '.join(LEVEL_SAMPLINGS)}")
        if self.power not in POWER_CHOICES:
            raise BdiffError(f"unknown --power {self.power!r}; choose {', '.join(POWER_CHOICES)}")
        if self.arch not in ("auto", "shared", "separate"):
            raise BdiffError(f"unknown arch {self.arch!r}; choose auto, shared or separate")
        if not (self.id_weight > 0 and math.isfinite(self.id_weight)):
            raise BdiffError(f"the scalar-field loss weight must be positive, got {self.id_weight}")
        if self.fourier is not None and not (isinstance(self.fourier, int) and 0 <= self.fourier <= MAX_FOURIER):
            raise BdiffError(f"--fourier must be a whole number of features in [0, {MAX_FOURIER}], "
                             f"got {self.fourier}")
        if self.eps_max is not None and not (self.eps_max >= 0 and math.isfinite(self.eps_max)):
            raise BdiffError(f"--eps-max must be 0 (no levels) or a positive variance, got {self.eps_max}")
        if self.eps_floor is not None and not (1e-8 <= self.eps_floor <= 100):
            raise BdiffError(f"--eps-floor {self.eps_floor} is outside the sensible range [1e-8, 100]")
        if not 0 <= self.query_balance <= 1:
            raise BdiffError(f"--query-balance must lie in [0, 1] (0: uniform query rows, 1: every "
                             f"cluster alike), got {self.query_balance}")
        if not 0 <= self.val_fraction < 0.5 or self.eval_every < 1 or self.patience < 0:
            raise BdiffError("validation settings need 0 <= val_fraction < 0.5, eval_every >= 1, "
                             "patience >= 0")
        if self.eps is not None and not (1e-6 <= self.eps <= 100):
            raise BdiffError(f"--eps {self.eps} is outside the sensible range [1e-6, 100] "
                             "(ε is a variance in standardised units; the default is automatic)")
        check_device(self.device)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.query_mix = tuple(cfg.query_mix)
        return cfg


POWER_CHOICES = ("auto", "on", "off")
POWER_JUDGE_ROWS = 2000  # rows the column coding is judged on (about 0.2 s on 2 cores)
# the share of the judge's row gains clipped at each end where a tail sets a column's spread:
# 5000 Cauchy rows gained 1 nat each on 90 % of the rows under tail powers, one row 143 000, and
# that one's noise hid the rest (1.4 standard errors). Clipped everywhere, radar's three columns
# were coded and scored 0.10 nats worse (NOTES.md)
TAIL_JUDGE_WINSORIZE = 0.01
POWER_JUDGE_FOLDS = 5  # each of them held out once: a table of 200 rows still gives 200 gains


def column_coding(values, power, seed, backend=None):
    """The PowerCoding of a table's skewed columns, or None (power "off", or no column whose
    fitted power is away from 1; columns of codes or counts, and constant ones, are left as they
    are). "auto" keeps it only where a kernel density at its best ε (heldout_bandwidth's grid)
    predicts the rows, each held out once (POWER_JUDGE_FOLDS folds), clearly better
    (density.clearly_better) in data units with the coding than with plain standardisation: a
    bimodal column's power warps its modes (faithful's eruptions: fitted power 1.57, held-out
    log-likelihood -4.06 -> -4.12 with it), a skewed column's brings its tail in (NOTES.md).
    "on" adds tail powers for heavy symmetric tails; auto only for columns whose tail sets their
    spread or leaves them without variance (data.tail_set_columns: Cauchy-like, Student-t with
    under 2 degrees of freedom). Below that the training rows cannot
    tell a heavy tail from a mixture's far modes (the rows of a 2-D Gaussian mixture fitted tail
    powers 0 and the judge kept them; its samples' far share went 0.14 -> 0.66 %), and on daily
    returns their gain, decided by crash days, is within the judge's noise (sp500: 0.027 +-
    0.015 nats; held-out -- a split with the 1987 crash -- 2.918 -> 3.195 under "on")."""
    if power == "off":
        return None
    rng = np.random.default_rng(seed)
    if len(values) > POWER_PROBE_ROWS:  # a random subset: a file may be sorted by a column
        values = values[np.sort(rng.choice(len(values), POWER_PROBE_ROWS, replace=False))]
    probe = np.asarray(values, np.float64)
    # constant columns: its own check; tail powers only when asked (see the docstring)
    codes = set(discrete_columns(probe))
    tails = range(probe.shape[1]) if power == "on" else tail_set_columns(probe, skip=codes)
    coding = PowerCoding.fit(probe, skip=codes, tails=tails)
    if coding is None or power == "on":
        return coding
    rows = probe[rng.permutation(len(probe))[:POWER_JUDGE_ROWS]]
    # the folds refit this coding's own transforms, no others: a column left plain on all rows
    # (radar's first band, by its cluster gap) could draw a tail power on a fold's rows, and the
    # judge would then pass a coding it had not weighed (radar: -18.936 -> -19.039 held out)
    uncoded = {column for column in range(probe.shape[1]) if coding.power[column] == 1 and coding.tail[column] == 1}
    fold_tails = [column for column in tails if coding.tail[column] < 1]
    folds = np.array_split(np.arange(len(rows)), min(POWER_JUDGE_FOLDS, len(rows)))  # none empty
    plain, coded = [], []
    for fold in folds:
        held, rest = rows[fold], rows[np.setdiff1d(np.arange(len(rows)), fold)]
        # the fold's own powers, fitted without its rows: powers fitted on the rows they are
        # judged on gain about 0.5/n nats per column in-sample, which coded Gaussian tables of
        # many columns and few rows (NOTES.md)
        fold_coding = PowerCoding.fit(rest, skip=codes | uncoded, tails=fold_tails) if len(rest) > 1 else None
        for candidate, per_row in ((None, plain), (fold_coding, coded)):
            scale = Standardizer.fit(rest, coding=candidate)
            loglik = heldout_row_logliks(torch.from_numpy(scale.forward(held)),
                                         torch.from_numpy(scale.forward(rest)), backend)
            per_row.append(loglik + scale.log_jacobian(held))
    # a tail's far rows gain 10^5 nats under the coding: their noise would hide the rest's gain
    clipped = TAIL_JUDGE_WINSORIZE if np.any(coding.tail < 1) else 0.0
    return coding if clearly_better(np.concatenate(coded), np.concatenate(plain), winsorize=clipped) else None


def same_coding(stored, fitted):
    """Whether two column codings (or None) code alike, to rounding."""
    if stored is None or fitted is None:
        return stored is fitted
    kept, now = stored.to_dict(), fitted.to_dict()
    return kept.keys() == now.keys() and all(
        np.allclose(np.asarray(kept[key], np.float64), np.asarray(now[key], np.float64), rtol=1e-9, atol=1e-9)
        for key in kept)


class Trainer:
    """Owns the model, EMA copy, optimiser and RNG; `run` trains and checkpoints."""

    def __init__(self, data, cfg, source="data", item_shape=None):
        cfg = dataclasses.replace(cfg)  # resolved below; the caller's config stays as given
        cfg.validate()
        self.cfg, self.source = cfg, source
        values = data if isinstance(data, np.ndarray) else np.asarray(data)
        self.item_shape = tuple(item_shape or values.shape[1:])
        image = is_image(self.item_shape)
        if cfg.steps is None:
            cfg.steps = IMAGE_STEPS if image else STEPS
        level_sampling_given = cfg.level_sampling != "auto"
        if not level_sampling_given:
            cfg.level_sampling = "log-normal" if image else "log-uniform"
        if image:
            if cfg.power == "on":
                raise BdiffError("--power codes the columns of a table; image data have --pixel-logit")
            cfg.power = "off"
            coding = PixelCoding.fit(values) if cfg.pixel_logit else None
        else:
            coding = column_coding(values, cfg.power, cfg.seed, cfg.backend)
            cfg.power = "off" if coding is None else "on"  # resolved: a resumed run codes alike
        self.standardizer = Standardizer.fit(values, pooled=image, coding=coding)
        if self.standardizer.constant.all():
            raise BdiffError(f"{source}: all rows are identical; there is no distribution to learn")
        self.constant_columns = [int(i) for i in np.flatnonzero(self.standardizer.constant)]
        self.fingerprint = fingerprint(values)
        self.device = torch.device(cfg.device)
        noise = None  # integer pixels: one fixed dequantisation draw per value
        if isinstance(coding, PixelCoding) and coding.integer:
            noise = np.random.default_rng(cfg.seed).random(values.shape, dtype=np.float32)
        rows = torch.from_numpy(self.standardizer.forward(values, noise))
        self.far_scaled_columns = [] if image else scale_set_by_far_rows(rows.numpy(), self.standardizer)
        self.rows_set_apart = {}
        if self.far_scaled_columns:
            scaled, self.rows_set_apart = self.standardizer.scaled_without_rows_set_apart(
                rows.numpy(), self.far_scaled_columns)
            rows = torch.from_numpy(scaled)
        rows = rows.to(self.device)
        self.dim = rows.shape[1]
        cfg.param = resolve_param(cfg.param)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.refs, self.val_rows = split_validation(rows, cfg.val_fraction, self.generator)
        self.eps_scores = self.eps_model_scores = None
        self.flow_eps = self.flow_scores = None  # the flow density's level (choose_eps)
        self.flow_base = None  # and its top level, the rows' mixture (choose_eps; tables)
        self.support_log_s = None  # the sampler's trimming floor, set when training ends
        self.end_level = self.end_search = None  # where the annealing samplers end, set then too
        if cfg.eps_rule == "auto":
            cfg.eps_rule = "heldout"
        if cfg.eps is not None:
            self.eps = cfg.eps
        elif cfg.eps_rule == "heldout":
            self.eps, self.eps_scores = heldout_bandwidth(self.refs, self.generator, backend=cfg.backend)
        else:
            self.eps = bandwidth(len(values), self.dim, cfg.eps_rule)
        self.levels = noise_levels(self.refs, self.eps, cfg.param, cfg.eps_max, cfg.eps_floor)
        if self.levels is None and level_sampling_given:
            raise BdiffError("--level-sampling chooses how training draws noise levels; it needs "
                             "noise levels (log fields, --eps-max not 0)")
        self.eps_train = self.eps  # the targets' ε; choose_eps may move the density's ε up from it
        if cfg.arch == "auto":
            cfg.arch = "shared" if self.levels is None else "separate"
        table_with_levels = self.levels is not None and not image
        low_dim = table_with_levels and self.dim <= LOW_DIM
        if cfg.width is None:
            cfg.width = LOW_DIM_WIDTH if low_dim else WIDTH
        if cfg.batch_size is None:
            cfg.batch_size = (SMALL_BATCH if len(values) < SMALL_DATA_ROWS
                              else LOW_DIM_BATCH if low_dim else BATCH)
        # activations of both networks, forward and backward, with room to spare
        check_memory(cfg.batch_size * (cfg.width * cfg.depth * 64 + self.dim * 64), "--batch-size")
        if cfg.fourier is None:
            fourier_table = table_with_levels and self.dim <= FOURIER_MAX_DIM
            cfg.fourier = FOURIER_FEATURES * (self.dim if low_dim else 1) if fourier_table else 0
        self.source_weights = self._source_weights()
        self._build()
        self.step = 0
        self.log_c = log_normaliser(self.refs, self.eps, self.generator, backend=cfg.backend)
        self.validation = None if self.val_rows is None else ValidationSet(
            self.val_rows, self.refs, self.eps, self.log_c, self.levels, self.generator, cfg.backend,
            self._validation_weights(table_with_levels))
        self.best_val, self.val_history = math.inf, []
        self.first_val = self.progress_val = self.stale = None  # per judge, from the first check

    def _validation_weights(self, table_with_levels):
        """Tables of more than LOW_DIM columns also judge the fit by the mean of each cluster's
        own validation loss, and stop only when it has stalled as well as the plain mean: on a
        5-D mixture with 8 % and 2 % modes the plain mean stalled at 1600 steps while those
        modes still learned (mode-weight error under SMC 0.020, 0.011 at the clusters' stall at
        2800; annealing 0.027, 0.017; NOTES.md). In 2-D the plain mean's stop lost nothing (a
        random law's 2 % modes read the same at 1600 and 3000 steps), and 2-D fits keep to
        their time budget."""
        if not table_with_levels or self.dim <= LOW_DIM or len(self.val_rows) < MIN_STOPPING_ROWS:
            return None
        return cluster_balanced_weights(self.val_rows, 1.0, self._clusters)

    def _source_weights(self):
        if self.levels is None or not self.cfg.query_balance:
            return None
        return cluster_balanced_weights(self.refs, self.cfg.query_balance, self._clusters)

    @functools.cached_property
    def _clusters(self):
        """The training rows' clusters, fitted once for the query weights and the judge's."""
        return data_clusters(self.refs, self.cfg.seed)

    def _build(self):
        torch.manual_seed(self.cfg.seed)
        self.model = FieldModel(self.dim, self.cfg.width, self.cfg.depth, self.cfg.arch,
                                self.cfg.param, self.levels, self.cfg.fourier,
                                FOURIER_REACH / math.sqrt(self.eps_train), self.cfg.seed).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = Adam(self.model.parameters(), lr=self.cfg.lr)
        # listed once, beside the optimiser's list of the model's (same order): walking the
        # modules for them every step took 1.4 % of a 2-D fit
        self.ema_params = list(self.ema.parameters())

    def meta(self):
        return {"config": asdict(self.cfg), "eps": self.eps, "eps_train": self.eps_train, "log_c": self.log_c,
                "standardizer": self.standardizer.to_dict(), "dim": self.dim,
                "far_scaled_columns": [list(found) for found in self.far_scaled_columns],
                "item_shape": list(self.item_shape), "fingerprint": self.fingerprint,
                "step": self.step, "source": self.source, "n_train": len(self.refs),
                "eps_search": self.eps_scores,
                "eps_model_search": self.eps_model_scores,
                "flow_eps": self.flow_eps, "flow_search": self.flow_scores, "flow_base": self.flow_base,
                "support_log_s": self.support_log_s,
                "end_level": self.end_level, "end_search": self.end_search,
                "levels": None if self.levels is None else list(self.levels),
                "n_validation": 0 if self.val_rows is None else len(self.val_rows),
                "validation": self.val_history}

    def save(self, path):
        save_checkpoint(path, self.model, self.ema, self.optimizer, self.generator, self.meta())

    def restore(self, path, given=()):
        """Continue from a checkpoint of a run on the same data, with that run's settings: only
        RESUME_OPTIONS are taken from now. `given` names the options the user set; one that
        differs from the stored run's is an error, not silently ignored."""
        tensors, meta = read_checkpoint(path)
        if meta.get("fingerprint") != self.fingerprint:
            raise BdiffError(f"{path} was trained on different data ({meta.get('source')}); "
                             "resume needs the same data set")
        # runs from before these options: log-uniform levels, no Fourier features, no column powers
        stored = FitConfig.from_dict({"level_sampling": "log-uniform", "fourier": 0, "power": "off",
                                      **meta["config"]})
        if stored.power != self.cfg.power:  # the rows were coded otherwise when that run began
            raise BdiffError(f"{path} was fitted with --power {stored.power}; resume it with --power "
                             f"{stored.power}")
        if not same_coding(coding_from_dict(meta["standardizer"].get("coding")), self.standardizer.coding):
            raise BdiffError(f"{path} coded its columns otherwise than this bdiff codes them (a run "
                             "from an earlier version?); start a new run with --force")
        if meta["dim"] != self.dim:
            raise BdiffError(f"{path} models {meta['dim']} columns where this bdiff models {self.dim} (it "
                             "leaves constant columns out since 2026-12-02); start a new run with --force")
        scaled = meta["standardizer"]
        if not (np.allclose(scaled["mean"], self.standardizer.mean, rtol=1e-6, atol=0)
                and np.allclose(scaled["std"], self.standardizer.std, rtol=1e-6, atol=0)):
            raise BdiffError(f"{path} scaled its columns otherwise than this bdiff scales them (a run "
                             "from before rows set apart were left out of a column's scale?); start a "
                             "new run with --force")
        for name in given:
            if name in RESUME_OPTIONS or not hasattr(stored, name):  # not a training setting
                continue
            mine, theirs = getattr(self.cfg, name), getattr(stored, name)
            automatic = name in ("eps_rule", "param", "arch", "level_sampling", "fourier") and mine in ("auto", None)
            if mine != theirs and not automatic:
                raise BdiffError(f"--{name.replace('_', '-')} {mine} differs from the stored run's "
                                 f"{theirs}; --resume continues that run with its own settings "
                                 "(start a new run with --force instead)")
        self.cfg = dataclasses.replace(stored, **{k: getattr(self.cfg, k) for k in RESUME_OPTIONS})
        self.eps, self.log_c, self.step = meta["eps"], meta["log_c"], meta["step"]
        self.eps_train = meta["eps_train"]
        self.eps_scores, self.eps_model_scores = meta.get("eps_search"), meta.get("eps_model_search")
        self.flow_eps, self.flow_scores = meta.get("flow_eps"), meta.get("flow_search")
        self.flow_base = meta.get("flow_base")
        self.val_history = [tuple(item) for item in meta.get("validation", [])]  # stopping restarts
        self.levels = None if meta.get("levels") is None else tuple(meta["levels"])
        self.source_weights = self._source_weights()
        try:
            self._build()
            self.model.load_state_dict(split_state(tensors, "model"))
            self.ema.load_state_dict(split_state(tensors, "ema"))
            self.optimizer.load_state_dict(optimizer_state(tensors))
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise BdiffError(f"{path} is inconsistent with its own configuration: {err}")
        self.generator.set_state(tensors["rng"])

    def learning_rate(self, step):
        """Cosine decay to 5% over the run, after a short linear warm-up."""
        warm = min(100, self.cfg.steps // 10)
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return self.cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self):
        self.optimizer.lr = self.learning_rate(self.step)
        refs, source_weights = self.refs_for_step()
        loss, loss_grad, loss_id = field_loss(self.model, refs, self.eps_train, self.log_c, self.cfg,
                                              self.generator, self.cfg.backend, source_weights)
        if not math.isfinite(loss.item()):
            raise BdiffError(f"training diverged at step {self.step} (loss {loss.item()}); "
                             "try a smaller --lr or a larger --eps")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(self.ema_params, self.optimizer.params, 1 - decay)
        self.step += 1
        return loss.item(), loss_grad, loss_id

    def refs_for_step(self):
        """This step's references (all rows up to max_refs, else a random subset) and the
        weights their queries' rows are drawn by (None: uniform)."""
        if len(self.refs) <= self.cfg.max_refs:
            return self.refs, self.source_weights
        chosen = torch.randperm(len(self.refs), generator=self.generator)[:self.cfg.max_refs]
        return self.refs[chosen], None if self.source_weights is None else self.source_weights[chosen]

    def validate(self):
        """The field losses of the EMA fields on the validation rows; True when training should
        stop: in `patience` checks no judge's loss has fallen by VAL_TOLERANCE of its fall so
        far. The judges are the plain mean (without the largest TRIM_SHARE of its log s errors:
        a sparse tail's few rows stopped a banana at 900 steps) and, on wide tables, the mean of
        the clusters' losses (_validation_weights); either may stall first, and stopping on the
        first cost the small modes' weights on unbalanced5d's draws (NOTES.md).
        (A share of the loss itself stopped digits after 14 s of a 67 s run: the score targets'
        noise at the smallest levels is a floor under the loss, NOTES.md.) The best weights by
        the last judge from MIN_QUERY_PASSES on are kept.
        (The rows' unnormalised log-likelihood was tried as the judge and stopped far too
        early: it cannot see mass leaking away from the data; NOTES.md.)"""
        losses = self.validation.losses(self.ema, self.cfg.id_weight)
        loss = losses[-1]
        self.val_history.append((self.step, loss))
        passes_done = self.step * self.cfg.batch_size / len(self.refs) >= MIN_QUERY_PASSES
        # weights from before that point are not candidates: their loss is the large modes' verdict
        if passes_done and loss < self.best_val:
            self.best_val = loss
            self.best_state = copy.deepcopy(self.ema.state_dict())
        if self.first_val is None:
            self.first_val, self.progress_val, self.stale = list(losses), list(losses), [0] * len(losses)
        else:
            for judge, value in enumerate(losses):
                fall = self.first_val[judge] - self.progress_val[judge]
                if value < self.progress_val[judge] - VAL_TOLERANCE * fall:
                    self.progress_val[judge], self.stale[judge] = value, 0
                else:
                    self.stale[judge] += 1
        return passes_done and self.cfg.patience > 0 and min(self.stale) >= self.cfg.patience

    def choose_eps(self):
        """With noise levels and validation rows: ε becomes the level, from the targets' ε up to 16 times it,
        whose normalised learned density best predicts the validation rows. The rule-of-thumb or
        KDE choice of ε can be sharper than the network can follow (sharp edges), and then
        the model's mass leaks (NOTES.md)."""
        if self.levels is None or self.val_rows is None or self.cfg.eps is not None:
            return
        base, eps_max = self.eps_train, self.levels[1]
        candidates = [base * 2 ** (k / 2) for k in range(9) if base * 2 ** (k / 2) < eps_max]
        self.eps, self.eps_model_scores = select_eps(self.ema, self.val_rows, self.refs, self.log_c,
                                                     candidates, seed=self.cfg.seed)
        _, field_score, z, se = self._density_eps_score()
        # images keep N(0, (1 + ε_max) I) at the top: a 64-D mixture by BIC is not worth its cost
        self.flow_base = None if is_image(self.item_shape) else flow_base(self._clusters)
        self.flow_eps, self.flow_scores = select_flow_eps(self.ema, self.val_rows, self.eps,
                                                          field_score if reliable(z, se) else None,
                                                          base=self.flow_base)

    def choose_end_level(self):
        """The level the annealing samplers end at (sampler.choose_end_level), judged on samples
        as the user gets them (decoded, snapped to the columns' values) against the training
        rows. Tables only: images keep ε_min, where digits' 2000-level anneal was measured."""
        if self.levels is None or is_image(self.item_shape):
            return
        fields = TrainedModel(self.ema, self.eps, self.log_c, self.standardizer,
                              {"support_log_s": self.support_log_s, "flow_base": self.flow_base})
        decode = lambda x: self.standardizer.forward(self.standardizer.inverse(x.cpu().numpy()))
        level, ratios = choose_end_level(fields, self.refs.cpu(), fields.sample_config(seed=self.cfg.seed), decode)
        self.end_level, self.end_search = level, sorted(ratios.items())

    def _density_eps_score(self):
        """(ε, validation score, Z, se) of the density's ε in choose_eps's search."""
        return next(item for item in self.eps_model_scores if item[0] == self.eps)

    def fit_report(self):
        """Lines for the user about the fitted density: the chosen ε, a warning when its
        normaliser is off by more than 10 % (mass leaking off the data), and the flow density
        where it predicted the validation rows better."""
        if not self.eps_model_scores:
            return []
        eps, field_score, z, se = self._density_eps_score()
        if not reliable(*self.eps_model_scores[0][2:]):  # select_eps then keeps the first
            # in high D always; in low D when sharp spikes of the scalar field make the weights heavy
            lines = [f"ε = {eps:.4g}: its normaliser could not be estimated to 5 % ({self.dim}-D), "
                     "so no level is chosen by likelihood"]
        else:
            lines = [f"ε = {eps:.4g} (the level whose normalised density best predicts the "
                     f"validation rows; the targets' ε {self.eps_train:.4g})"]
        if reliable(z, se) and abs(z - 1) > 0.1:
            lines.append(f"warning: the learned density integrates to {z:.3f} ± {se:.3f}, not 1; "
                         "its likelihood is reported normalised, but samples may stray from the data")
        if self.end_level is not None and self.end_level > self.levels[0]:
            ratios = dict(self.end_search)
            lines.append(f"samples end at level {self.end_level:.4g}, not ε_min = {self.levels[0]:.4g}: "
                         f"there they sit {ratios[self.end_level]:.2f} times as far from the training rows "
                         f"as the rows from each other (at ε_min {ratios[self.levels[0]]:.2f}: copies of "
                         "the rows)")
        if self.flow_eps is not None:
            versus = f" against the field's {field_score:.3f}" if reliable(z, se) else ""
            lines.append(f"density: the score's probability flow from ε = {self.flow_eps:.4g} "
                         f"(validation log-likelihood {dict(self.flow_scores)[self.flow_eps]:.3f} "
                         f"per row in standardised units{versus})")
        return lines

    def run(self, checkpoint_path=None, on_step=None):
        """Train to cfg.steps, or until the validation loss stalls (then the best EMA weights
        are kept). Checkpoints every cfg.checkpoint_every steps, at the end, and on Ctrl-C
        (then re-raises KeyboardInterrupt so the caller can exit)."""
        start = time.perf_counter()
        self.stopped_early, self.signal = False, None
        may_stop = self.validation is not None and len(self.val_rows) >= MIN_STOPPING_ROWS
        with _deferred_interrupt() as interrupted:
            while self.step < self.cfg.steps and not interrupted():
                losses = self.train_step()
                if on_step is not None:
                    on_step(self.step, losses, time.perf_counter() - start)
                if may_stop and self.step % self.cfg.eval_every == 0 and self.validate():
                    self.stopped_early = self.step < self.cfg.steps  # at the cap it ended anyway
                    self.ema.load_state_dict(self.best_state)
                    break
                if checkpoint_path and self.step % self.cfg.checkpoint_every == 0:
                    self.save(checkpoint_path)
        if interrupted():
            self.signal = interrupted()
            if checkpoint_path:
                self.save(checkpoint_path)
            raise KeyboardInterrupt
        self.choose_eps()
        rows = self.refs if self.val_rows is None else torch.cat([self.refs, self.val_rows])
        self.support_log_s = support_floor(self.ema.fields_batched(rows, log=True, eps=self.eps)[0])
        self.choose_end_level()
        if checkpoint_path:
            self.save(checkpoint_path)
        return time.perf_counter() - start


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn Ctrl-C and SIGTERM into a flag checked between steps, so a checkpoint never holds
    half a step. The flag reads as the signal's number (0 before one arrives)."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, _: received.append(number)) for number in handled}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
