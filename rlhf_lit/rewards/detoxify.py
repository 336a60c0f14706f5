"""Toxicity scores from Detoxify (unitaryai), batched, with offline loading that really is offline."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from rlhf_lit.errors import MissingPathError
from rlhf_lit.tokenizer import reconcile_special_tokens

from .base import RewardBackend, RewardOutput
from .offload import HostOffload

log = logging.getLogger(__name__)

ModelType = Literal["original", "unbiased", "multilingual", "original-small", "unbiased-small"]

# Detoxify standardises these class names when it loads a checkpoint (detoxify.load_checkpoint).
_RENAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


class Detoxify(RewardBackend):
    """Toxicity probability from a Detoxify model (BERT/RoBERTa/ALBERT/XLM-R trained on Jigsaw data).

    The raw score is the chosen attribute's probability in [0, 1] (1 = toxic), or a weighted sum of
    several attributes; use ``scale: -1`` to reward non-toxic text. Detoxify scores swear words as
    toxic whatever the intent, so a policy optimised against it can learn to game words rather than
    harm: watch the samples.

    Weights: without ``checkpoint`` Detoxify downloads the ``model_type`` checkpoint from GitHub
    releases (cached by ``torch.hub``) and the base config/tokenizer from the Hugging Face Hub. For
    offline use give ``checkpoint`` (the ``.ckpt`` file: a torch dict with ``config`` and
    ``state_dict``) and ``huggingface_config_path`` (a folder with ``config.json`` whose
    ``num_labels`` matches the checkpoint -- 6 for original, 16 for unbiased/multilingual -- and the
    tokenizer files). This backend then points the checkpoint's base ``model_type`` at that folder,
    so that nothing asks the Hub (Detoxify alone still would).

    Security: checkpoints are loaded with ``torch.load(weights_only=False)``, as Detoxify does; that
    can run arbitrary code from the file. Only use checkpoint files you trust.

    Args:
        model_type: Which Detoxify model: original, unbiased, multilingual, original-small,
            unbiased-small. Picks the checkpoint to download when ``checkpoint`` is not given.
        attributes: The Detoxify key to score (toxicity, severe_toxicity, obscene, threat, insult,
            identity_attack, and sexual_explicit for unbiased/multilingual), or a mapping
            key -> weight for a weighted sum, e.g. ``{toxicity: 1.0, insult: 0.5}``. Checked against
            the loaded model's keys.
        include_prompt: Score ``prompt + "\\n" + response`` instead of the response alone.
        device: Device for the classifier; None uses the trainer's device given to ``setup``;
            ``cpu`` forces the CPU (keeps the GPU for the policy).
        offload: On a GPU, keep the classifier's weights in pinned CPU memory and copy them to the GPU
            only while scoring (about 0.05 s per GB each rollout): the policy gets that memory.
        batch_size: Texts per forward pass (Detoxify itself does no batching).
        max_length: Inputs are truncated to this many tokens.
        checkpoint: Local Detoxify ``.ckpt`` file (trusted files only: it is unpickled). None
            downloads the ``model_type`` checkpoint.
        huggingface_config_path: Local folder with the base model's ``config.json`` and tokenizer
            files, for offline loading. None fetches them from the Hugging Face Hub.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``detoxify``; each attribute used is also reported as a component under its own key (``reward/toxicity``, ...).
    """

    default_name = "detoxify"

    def __init__(
        self,
        model_type: ModelType = "original",
        attributes: Union[str, dict[str, float]] = "toxicity",
        include_prompt: bool = False,
        device: Optional[str] = None,
        offload: bool = False,
        batch_size: int = 32,
        max_length: int = 512,
        checkpoint: Optional[str] = None,
        huggingface_config_path: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model_type not in ModelType.__args__:
            raise ValueError(f"Detoxify: model_type must be one of {list(ModelType.__args__)}, got {model_type!r}")
        if isinstance(attributes, str):
            weights = {attributes: 1.0}
        elif isinstance(attributes, dict) and attributes:
            weights = {str(k): float(v) for k, v in attributes.items()}
        else:
            raise ValueError(
                f"Detoxify: attributes must be a key name such as 'toxicity' or a non-empty mapping "
                f"name -> weight, got {attributes!r}"
            )
        bad = {k: v for k, v in weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"Detoxify: attribute weights must be finite, got {bad}")
        if int(batch_size) < 1:
            raise ValueError(f"Detoxify: batch_size must be >= 1, got {batch_size}")
        if int(max_length) < 2:
            raise ValueError(f"Detoxify: max_length must be >= 2 tokens, got {max_length}")
        if self.name in weights and len(weights) > 1:
            raise ValueError(
                f"Detoxify: name {self.name!r} is also one of several attributes; choose another name for the sum"
            )
        self.model_type = model_type
        self.attributes = attributes
        self.weights = weights
        self.include_prompt = bool(include_prompt)
        self.device_option = device
        self.offload = bool(offload)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        # Checked when the CLI builds the backend, before the policy loads.
        if checkpoint and not Path(checkpoint).expanduser().is_file():
            raise MissingPathError(f"Detoxify {self.name!r}: checkpoint file {checkpoint!r} does not exist (option "
                                   f"'checkpoint': a Detoxify .ckpt; leave it out to use model_type's published weights)")
        if huggingface_config_path and not Path(huggingface_config_path).expanduser().is_dir():
            raise MissingPathError(f"Detoxify {self.name!r}: huggingface_config_path={huggingface_config_path!r}: no "
                                   f"such folder (expected the transformers config/tokenizer folder of the checkpoint)")
        self.checkpoint = checkpoint
        self.huggingface_config_path = huggingface_config_path
        self._detox: Any = None  # a detoxify.Detoxify, loaded lazily
        self._on_device: Any = contextlib.nullcontext()  # a HostOffload with offload on a GPU
        self.class_names: Optional[list[str]] = None

    # ------------------------------------------------------------------ loading
    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def _target_device(self) -> torch.device:
        return torch.device(self.device_option) if self.device_option else self.device

    def _read_checkpoint(self) -> dict:
        if self.checkpoint is not None:
            path = Path(self.checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"Detoxify: checkpoint file {str(path)!r} does not exist (option 'checkpoint' expects a "
                    f"local Detoxify .ckpt file)"
                )
            try:  # trusted files only, see the class docstring
                loaded = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise RuntimeError(f"Detoxify: could not load checkpoint {str(path)!r}: {e}") from e
            where = repr(str(path))
        else:
            from detoxify.detoxify import MODEL_URLS

            url = MODEL_URLS[self.model_type]
            try:
                loaded = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=False)
            except Exception as e:
                raise RuntimeError(
                    f"Detoxify: downloading the {self.model_type!r} checkpoint from {url} failed ({e}). "
                    f"Offline, download it elsewhere and set 'checkpoint' to the .ckpt file and "
                    f"'huggingface_config_path' to a folder with the base model's config and tokenizer."
                ) from e
            where = url
        try:
            args = loaded["config"]["arch"]["args"]
            classes = loaded["config"]["dataset"]["args"]["classes"]
            missing = [k for k in ("model_type", "model_name", "tokenizer_name", "num_classes") if k not in args]
            ok = isinstance(loaded["state_dict"], dict) and not missing and isinstance(classes, (list, tuple))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(
                f"Detoxify: checkpoint {where} is not in Detoxify's format: expected a dict with "
                f"'state_dict' and 'config' holding arch.args (model_type, model_name, tokenizer_name, "
                f"num_classes) and dataset.args.classes"
            )
        return loaded

    def _load(self) -> None:
        if self._detox is not None:
            return
        try:
            import detoxify.detoxify as dtx
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reward backend Detoxify needs the 'detoxify' package (pip install detoxify)") from e

        loaded = self._read_checkpoint()
        args = dict(loaded["config"]["arch"]["args"])
        hf_path = None
        if self.huggingface_config_path is not None:
            folder = Path(self.huggingface_config_path).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"Detoxify: huggingface_config_path {str(folder)!r} must be a folder with config.json and "
                    f"the tokenizer files of the base model ({args.get('model_type')!r})"
                )
            from transformers import AutoConfig

            n_labels = AutoConfig.from_pretrained(folder, local_files_only=True).num_labels
            if n_labels != int(args["num_classes"]):
                raise ValueError(
                    f"Detoxify: {str(folder / 'config.json')!r} has num_labels={n_labels} but the checkpoint has "
                    f"num_classes={args['num_classes']}; set num_labels (6 for original, 16 for "
                    f"unbiased/multilingual) in that config.json"
                )
            hf_path = str(folder)
            # Detoxify builds a throw-away config from arch.args.model_type (a Hub id) even when a local
            # folder is given; pointing it at the folder keeps everything offline.
            args["model_type"] = hf_path
        state_dict = loaded["state_dict"]
        try:
            model, tokenizer = dtx.get_model_and_tokenizer(
                **args, state_dict=state_dict, huggingface_config_path=hf_path
            )
        except OSError as e:
            if hf_path is None:
                raise OSError(
                    f"Detoxify: could not get the base config/tokenizer {args['model_type']!r} from the Hugging Face "
                    f"Hub ({e}). Offline, set 'huggingface_config_path' to a local folder with them."
                ) from e
            raise OSError(f"Detoxify: loading config/tokenizer from {hf_path!r} failed: {e}") from e
        missing = sorted(set(model.state_dict()) - set(state_dict))
        if missing:
            raise ValueError(
                f"Detoxify: the checkpoint's state_dict does not match {args['model_name']}: "
                f"{len(missing)} weights missing (e.g. {missing[:3]}); they would be random"
            )
        reconcile_special_tokens(tokenizer, model.config, f"Detoxify ({self.checkpoint or self.model_type})")
        class_names = [_RENAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        del loaded, state_dict
        unknown = [a for a in self.weights if a not in class_names]
        if unknown:
            raise ValueError(
                f"Detoxify: unknown attribute(s) {unknown} in option 'attributes'; the loaded model "
                f"({self.checkpoint or self.model_type}) has keys {class_names}"
            )
        device = self._target_device()
        if self.offload and device.type == "cuda":
            self._on_device = HostOffload(model.eval(), device)
        else:
            model.to(device).eval()
        # Detoxify.predict truncates to tokenizer.model_max_length: never beyond what the model can embed.
        limits = [self.max_length, int(getattr(model.config, "max_position_embeddings", 0) or 10**9)]
        if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            limits[1] -= 2  # their position ids start after the padding index
        if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
            limits.append(int(tokenizer.model_max_length))
        tokenizer.model_max_length = min(limits)
        if tokenizer.model_max_length < self.max_length:
            log.info("Detoxify: max_length %d capped to the model's %d", self.max_length, tokenizer.model_max_length)
        # A real detoxify.Detoxify around the model we loaded, so scoring goes through its predict().
        detox = dtx.Detoxify.__new__(dtx.Detoxify)
        detox.model, detox.tokenizer, detox.class_names, detox.device = model, tokenizer, class_names, device
        self.class_names = class_names
        self._detox = detox
        log.info("Detoxify %s loaded on %s, keys %s", self.checkpoint or self.model_type, device, class_names)

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: list[str], responses: list[str]):
        self._load()
        texts = [p + "\n" + r for p, r in zip(prompts, responses)] if self.include_prompt else list(responses)
        per_attr: dict[str, list[float]] = {a: [] for a in self.weights}
        results = []
        with self._on_device:  # one trip to the GPU for all chunks when offloaded
            for i in range(0, len(texts), self.batch_size):
                chunk = texts[i : i + self.batch_size]
                results.append((chunk, self._detox.predict(chunk)))
        for chunk, result in results:
            for a in per_attr:
                v = result[a]
                v = v if isinstance(v, list) else [v]  # Detoxify returns a float for a one-item list
                if len(v) != len(chunk):
                    raise RuntimeError(f"Detoxify returned {len(v)} {a!r} scores for {len(chunk)} texts")
                per_attr[a].extend(float(x) for x in v)
        components = {a: torch.tensor(v, dtype=torch.float32) for a, v in per_attr.items()}
        total = torch.zeros(len(texts), dtype=torch.float32)
        for a, w in self.weights.items():
            total += w * components[a]
        if self.name not in components:
            components = {self.name: total, **components}
        return RewardOutput(total, torch.ones(len(texts), dtype=torch.bool), components, {})

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_detox"] = None  # reloaded lazily
        state["_on_device"] = contextlib.nullcontext()
        return state
