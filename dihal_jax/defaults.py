"""The base ml_collections config every file in configs/ starts from.

Each configs/*.py calls `base()` and overrides a few fields, citing the HF
`config.json` they come from; a comment here explains every field once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

from dihal_jax.backbone import lora
from dihal_jax.parallel.sharding import DEFAULT_RULES


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random draw is fold_in(seed, ...)

  c.model = ml_collections.ConfigDict()
  # A local HF checkpoint directory, or "embedded:smollm2-135m-instruct". Empty:
  # no weights exist here; `hf_config` describes the architecture (random init).
  c.model.checkpoint = ""
  c.model.hf_config = ml_collections.ConfigDict()  # HF config.json fields (presets only)
  c.model.dtype = "float32"  # compute dtype of matmuls (norms/softmax stay float32)
  c.model.param_dtype = "float32"  # storage dtype of params
  # Attention kernel: "auto" (cuDNN flash attention on a GPU where dtype and shapes allow,
  # else "xla"), "xla" / "cudnn" (jax.nn.dot_product_attention), or "reference" (the
  # explicit float32 probabilities of backbone/model.py, as analysis/trace.py records them).
  c.model.attention = "auto"
  # The document separator every window starts with (docs/design.md, "Position 0");
  # falls back to the tokenizer's BOS when the vocabulary lacks it.
  c.model.separator = "<|endoftext|>"

  # Device mesh (data, fsdp, tensor); one axis may be -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = DEFAULT_RULES  # logical name -> mesh axes (parallel/sharding.py)
  # `dihal plan --topology=NAME`: the mesh to plan for on each topology, keyed by the name
  # with "-" -> "_" (v5e_8, v5e_16, v4_32, v5p_8, h100x8, h100x16) so that overrides parse
  # (--config.mesh_presets.v5e_8.fsdp=4). A topology without an entry gets
  # parallel/topology.py::default_mesh (FSDP over the fast interconnect, data across the rest).
  c.mesh_presets = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  # In-domain corpus: "builtin:austen" (shipped) or a folder of .txt/.txt.gz/.jsonl(.gz) files
  # (documents by the first rule that applies: data/corpus.py).
  c.data.dir = "builtin:austen"
  c.data.ood_dir = "builtin:moby_dick"  # out-of-domain evaluation text ("" = none)
  c.data.encoding = "utf-8"  # of the folder's files; "auto" = detect per file (charset-normalizer)
  c.data.text_field = "text"  # .jsonl records / tfds: the field holding the text
  # data.dir = "tfds:NAME[:CONFIG]": a prepared TFDS dataset (array_record) in this data_dir
  # ("" = TFDS's default), each project split read from the TFDS split named here.
  c.data.tfds_dir = ""
  c.data.tfds_splits = ml_collections.ConfigDict(dict(train="train", validation="validation",
                                                      test="test"))
  # Whole chapters per split, cut per book in this order (data/corpus.py).
  c.data.splits = ml_collections.ConfigDict(dict(train=0.8, validation=0.1, test=0.1))
  c.data.window = 64  # tokens per window, separator included (up to the model's max positions)
  c.data.batch_size = 16  # global windows per batch (split over processes, then devices)
  c.data.read_threads = 2  # grain ReadOptions.num_threads
  c.data.cache_dir = ""  # tfds + hidden-state caches; "" = $DIHAL_CACHE_DIR or ~/.cache/dihal_jax

  c.locate = ml_collections.ConfigDict()
  c.locate.num_tokens = 16384  # tokens streamed (rounded down to whole batches)
  c.locate.batch_size = 16  # windows per batch
  c.locate.layers = ""  # candidate layers, e.g. "1,2,5-9"; "" = 1..L-1
  c.locate.exclude_first = True  # position 0 (the separator's constant state) left out
  c.locate.reservoir = 2048  # R token states kept per layer (same positions for all layers)
  c.locate.anchors = 256  # M anchors for the local proxies
  c.locate.k = 16  # nearest neighbours per anchor
  c.locate.flat_dim = 4  # m: curvature = 1 - top-m eigenvalue share of the local covariance
  c.locate.pairs = 4096  # S pairs for stiffness (and the median pairwise distance)
  c.locate.ridge = 1e-3  # γ in P = (cov + γ tr(cov)/d I)^-1
  # Score weights (signs: + stiffness, - curvature, - erank, - compactness; docs/design.md).
  c.locate.weights = ml_collections.ConfigDict(
      dict(stiffness=1.0, curvature=-1.0, erank=-1.0, compactness=-1.0))
  # Which score picks l*: "weights" (the weights above) or "paper" (+curvature +stiffness
  # -erank, equal weights: geometry/locate.py::PAPER_WEIGHTS).
  c.locate.score = "weights"

  c.bridge = ml_collections.ConfigDict()
  c.bridge.layer = "auto"  # interface layer l: "auto" = l* of the locate report (runs locate)
  c.bridge.normalization = "per_channel"  # or "global", "pca_whiten" (bridge/normalization.py)
  c.bridge.pca_init = False  # UNet input projection d -> C initialized with the top-C PCA directions
  # The denoiser (bridge/denoiser.py): "unet" (from scratch) or "transformer" (blocks of the
  # backbone's architecture, bidirectional); bridge.init = "backbone" copies the blocks
  # ℓ+1..ℓ+m of the backbone (transformer.first_block: another start, 1-based), "scratch" not.
  c.bridge.denoiser = "unet"
  c.bridge.init = "scratch"
  # Compute dtype of the denoiser's matmuls, convs and attention: "float32" or "bfloat16"
  # (parameters, norms, softmax, the residual stream, the loss and the optimizer state stay
  # float32).
  c.bridge.dtype = "float32"
  c.bridge.transformer = ml_collections.ConfigDict(dict(  # bridge/transformer.py
      blocks=4, first_block=0, time_dim=128, self_condition=True))
  c.bridge.unet = ml_collections.ConfigDict(dict(  # bridge/unet.py::UNetConfig
      channels=128, channel_mults=(1, 2, 2), blocks_per_level=2, attention_levels=(1, 2),
      heads=4, groups=8, dropout=0.0, self_condition=False))
  c.bridge.diffusion = ml_collections.ConfigDict(dict(  # bridge/diffusion.py::DiffusionConfig
      schedule="cosine", prediction="auto", steps=50, sampler="ddim", eta=0.0))
  # prediction "auto": x0 for the transformer, v for the UNet (eps / x0 / v to choose)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps (a run may be extended: resumable change)
  c.train.batch_size = 16  # global windows per step
  c.train.lr = 3e-4
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.01
  c.train.clip_norm = 1.0
  c.train.ema_decay = 0.999  # reached after warm-up: decay_k = min(0.999, (1 + k)/(10 + k))
  c.train.self_condition_prob = 0.5  # self-conditioned denoisers: share of 2-pass examples
  # Weight of the auxiliary token loss: cross-entropy of the true tokens under the
  # current-token head applied to the x0 estimate (bridge/train_step.py); 0 = off.
  c.train.token_ce = 0.0
  # Weight of the upper-layer token loss: the x0 estimates of train.upper_ce_windows windows
  # per step through the frozen upper layers and LM head, cross-entropy of the true next
  # tokens (bridge/train_step.py::UpperCE); 0 = off. Each window costs a pass through the
  # upper layers and back.
  c.train.upper_ce = 0.0
  c.train.upper_ce_windows = 2
  # Training times: "uniform" t ~ U(1e-3, 1), or "logit_normal": logit(t) ~ N(mean, std)
  # (train.logit_normal = (mean, std)), which puts the steps on middle noise levels.
  # Validation always draws uniform t, so losses compare across the two.
  c.train.time_sampling = "uniform"
  c.train.logit_normal = (0.0, 1.0)
  c.train.checkpoint_every = 200
  c.train.max_to_keep = 3
  c.train.log_every = 10
  c.train.val_every = 100
  c.train.cache_windows = 4096  # train windows whose h_l is cached (the training set)
  c.train.val_windows = 256  # validation windows (fixed batch, fixed key)

  # The tolerant decoder (hybrid/tolerant_decoder.py): LoRA adapters of the layers above ℓ
  # trained after the bridge on its estimates of re-noised train states (`dihal train`, and
  # the readouts of its workdir, use it when enabled).
  c.tolerant = ml_collections.ConfigDict()
  c.tolerant.enabled = False
  c.tolerant.rank = 16
  c.tolerant.alpha = 16.0
  c.tolerant.steps = 300
  c.tolerant.batch_size = 8
  c.tolerant.lr = 5e-4
  c.tolerant.checkpoint_every = 100
  c.tolerant.val_every = 50

  c.mdm = ml_collections.ConfigDict()  # dihal mdm: the backbone post-trained into an MDM (mdm/)
  c.mdm.steps = -1  # optimizer steps; -1 = the bridge's windows (train.steps x train.batch_size)
  c.mdm.batch_size = 16  # global windows per step
  c.mdm.lr = 1e-4  # all weights are trained: a fine-tuning rate, not the bridge's
  c.mdm.warmup_steps = 50
  c.mdm.weight_decay = 0.01
  c.mdm.clip_norm = 1.0
  c.mdm.ema_decay = 0.999  # sampling uses the EMA (warmed up as in train.ema_decay)
  c.mdm.mask_id = -1  # absorbing-state token id; -1 = the tokenizer's mask or an unused special
  c.mdm.shift = True  # logits at i-1 predict the masked token at i (the AR head keeps its meaning)
  c.mdm.anneal_steps = 0  # causal -> bidirectional: causal OR Bernoulli(r), r = step/anneal_steps
  c.mdm.block = 0  # > 0: block diffusion (BD3-LM) with blocks of this many positions
  c.mdm.checkpoint_every = 100
  c.mdm.max_to_keep = 2
  c.mdm.log_every = 10
  c.mdm.val_every = 50

  c.sample = ml_collections.ConfigDict()  # dihal sample (hybrid/sample.py, hybrid/readout.py)
  c.sample.num = 64  # samples
  c.sample.length = 0  # positions per sample; 0 = data.window
  c.sample.steps = 50  # bridge sampler steps
  c.sample.readout = "blockwise"  # blockwise | lm_head | refine | identity | joint
  c.sample.block = 8  # blockwise: positions per block
  c.sample.temperature = 1.0  # lm_head draws (0 = argmax)
  c.sample.top_p = 0.9
  c.sample.beta = 1.0  # joint: weight of log p_id (the current-token head) beside the LM logits
  c.sample.rounds = 4  # refine: at most R rounds
  c.sample.renoise_t = 0.3  # refine: re-noise level
  c.sample.gap = 8  # infill: positions per [___]
  c.sample.batch = 32  # samples per jitted call
  c.sample.method = "bridge"  # dihal sample: "bridge" (DiHAL), "mdm" or "dglm" (their workdirs)
  c.sample.attribute = ""  # --method=dglm: steer toward NAME=VALUE[+NAME=VALUE] (dglm.targets)
  c.sample.mdm_steps = 32  # mdm: reveal steps (each one forward pass of the whole window)
  c.sample.unmask = "confidence"  # mdm: which masked positions a step reveals: confidence | random
  c.sample.mdm_block = 0  # mdm: semi-autoregressive blocks of this many positions (0 = one block)

  c.eval = ml_collections.ConfigDict()  # dihal eval (eval/evaluate.py)
  c.eval.methods = ""  # comma-separated rows; empty = all (evaluate.METHODS)
  c.eval.num = 64  # samples per method and seed; each set draws 2 x num real windows
  c.eval.seeds = 1  # sampling repeats with other keys (samples pooled; per-seed PPLs reported)
  c.eval.prefix = 32  # continuation task: tokens given (separator included); 0 = no such task
  c.eval.ngram_order = 4  # the Kneser–Ney judge's order (fit on the train split)
  c.eval.encoder = "all_minilm_l6_v2"  # MAUVE's sentence encoder (the package holding model.zip)
  c.eval.noise_levels = (0.1, 0.3, 0.5)  # bridge val MSE and token recovery at these t
  c.eval.mdm_block = 16  # row mdm_block: the MDM trained as block diffusion, blocks of this
  # many positions (0 = no such row)
  # Read every `joint` row (the bridges and the oracle) at the temperature matching real
  # text's unigram entropy (± 0.1 nats; eval/entropy_match.py) instead of sample.temperature.
  c.eval.match_entropy = False
  c.eval.show = 3  # sample texts per method in the report

  c.sweep = ml_collections.ConfigDict()  # dihal sweep (eval/sweep.py)
  c.sweep.seeds = 1  # runs per layer (seed = seed + s)
  c.sweep.epochs = 1.0  # train.steps = epochs x train.cache_windows / train.batch_size
  c.sweep.eval_windows = 64  # validation windows the recoveries are measured on
  c.sweep.noise_levels = (0.3, 0.5, 0.8)  # recoveries from windows noised to these t
  c.sweep.fitted_from = ""  # another sweep's report.json: its proposed weights, judged here

  c.ablate = ml_collections.ConfigDict()  # dihal ablate (eval/ablation.py)
  c.ablate.rows = ""  # comma-separated rows of eval/ablation.py::ROWS; empty = all
  # The joint readout's β at which every row is entropy-matched (T bisected at each); the
  # headline is the largest β at which every row and the oracle reach real text's entropy.
  c.ablate.betas = (1.0, 0.3, 0.1)

  c.mechanism = ml_collections.ConfigDict()  # dihal mechanism (analysis/mechanism.py)
  c.mechanism.mdm = ""  # workdir of the `dihal mdm` run to study; "" = WORKDIR/mdm
  c.mechanism.windows = 32  # test windows for CKA, attention statistics and the logit lens
  c.mechanism.mask_rate = 0.5  # share of those windows' positions the MDM sees masked
  c.mechanism.task_items = 32  # items per task (local "bigram", global "copy": analysis/tasks.py)
  c.mechanism.bigram_position = 24  # bigram task: position of the answer
  c.mechanism.span = 8  # copy task: tokens repeated ...
  c.mechanism.filler = 32  # ... after this many tokens of other text (cue distance span + filler)
  c.mechanism.masks = 8  # masked positions after each task's answer
  c.mechanism.head_layers = 2  # per-head patching at the layers whose block restores most

  c.dglm = ml_collections.ConfigDict()  # dihal dglm (dglm/run.py)
  c.dglm.books = "austen=builtin:austen,moby_dick=builtin:moby_dick"  # name=source, >= 2
  c.dglm.prefix = 8  # prefix tokens the decoder is given (after the separator)
  c.dglm.continuation = 24  # tokens the latent describes and the decoder writes
  c.dglm.train_windows = 4000  # train windows per book (balanced: the same count per book)
  c.dglm.test_windows = 256  # test windows per book
  c.dglm.vectors = 8  # soft-prompt vectors
  c.dglm.hidden = 1024  # projector MLP width
  c.dglm.lora_rank = 16  # LoRA adapters of the backbone trained with the projector; 0 = frozen
  c.dglm.lora_alpha = 16.0  # their scale is lora_alpha / lora_rank
  c.dglm.lora_targets = lora.ALL  # comma-separated kernels of every block (lora.KERNELS)
  c.dglm.latent_noise = 0.5  # training latents + N(0, (s/sqrt d)^2), s ~ U(0, this)
  c.dglm.latent_dropout = 0.1  # training latents zeroed with this probability
  c.dglm.steps = 800  # projector (and LoRA) optimizer steps
  c.dglm.batch_size = 8
  c.dglm.lr = 1e-3
  c.dglm.width = 768  # latent denoiser MLP width
  c.dglm.blocks = 4  # its residual blocks
  c.dglm.denoiser_steps = 2000
  c.dglm.denoiser_batch = 256
  c.dglm.denoiser_lr = 1e-3
  c.dglm.cond_dropout = 0.1  # prefix latent dropped (for classifier-free guidance)
  c.dglm.sampler_steps = 50  # DDIM steps of the latent
  c.dglm.prefix_guidance = 1.0  # classifier-free guidance weight on the prefix
  c.dglm.scale = 30.0  # classifier-guidance strength of the dglm_guided rows
  c.dglm.scale_sweep = (3.0, 10.0, 100.0)  # extra strengths for the first target
  c.dglm.targets = "book=moby_dick,book=austen,speech=dialogue,book=moby_dick+speech=dialogue"
  c.dglm.bridge_steps = 800  # DiHAL's labelled bridge (rows dihal, dihal_cfg/T); 0 = none
  c.dglm.bridge_guidance = 3.0  # its classifier-free guidance weight w
  c.dglm.bridge_label_dropout = 0.2  # each attribute of a training label dropped with this p
  c.dglm.num = 64  # test prefixes per row (half from each of the first two books)
  c.dglm.temperature = 1.0
  c.dglm.top_p = 0.95
  c.dglm.log_every = 10
  c.dglm.checkpoint_every = 100

  c.demo = ml_collections.ConfigDict()
  c.demo.preset = "quick"  # dihal demo budget: quick | full | smoke | none (demo.PRESETS)

  c.parity = ml_collections.ConfigDict()
  c.parity.rows = 4  # rows of real text, right-padded to different lengths
  c.parity.tokens = 288  # tokens in the longest row (>= 256: short prompts hide RoPE bugs)
  c.parity.generate_tokens = 32  # greedy tokens compared with transformers' generate
  c.parity.prompt_tokens = 48  # prompt length for the generation check
  c.parity.matmul_precision = "highest"  # JAX matmuls during the check (GPU default: TF32)
  c.parity.max_mean_kl = 1e-6  # targets (float32)
  c.parity.max_abs_logit_diff = 1e-3

  c.convert = ml_collections.ConfigDict()
  c.convert.max_shard_gb = 2.0  # export: safetensors shard size
  c.convert.dtype = ""  # export dtype; empty = the source checkpoint's
  return c


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/*.py), outside the CLI's flag parsing."""
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
