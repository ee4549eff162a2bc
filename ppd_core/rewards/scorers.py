"""Reward models behind one interface: uint8 images (N, H, W, 3) + prompts -> float64 scores (N,).

This file owns what every reward computes, where its weights come from and how they are checked.

=================  ==========================================================  ============================
kind               model                                                       score
=================  ==========================================================  ============================
oracle             the synthetic world's user reward (per user)                weights_u . z(image)
oracle_attribute   one z-scored world attribute                                z(image)[attribute]
pickscore          HF ``CLIPModel`` (PickScore_v1) + CLIP-H processor          logit_scale.exp() * cos
hps                open_clip ViT-H-14 + HPS v2 / v2.1 ``{"state_dict"}`` file  100 * cos
aesthetic          LAION aesthetic v2 MLP on L2-normalised CLIP ViT-L/14       MLP(normalize(f(image)))
clip_score         HF ``CLIPModel`` (default openai/clip-vit-large-patch14)    100 * max(cos, 0)
image_reward       ``ImageReward.load`` (only when the package is installed)   its standardised score
=================  ==========================================================  ============================

Conventions (the Diffusion-DPO conventions): PickScore as its README (logit scale read
from the weights, ~21 for real images); HPS x100 as the papers report it (hpsv2's ``score()``
returns the raw cosine, ~0.27); CLIP score as torchmetrics' ``CLIPScore``. Every CLIP-family
reward preprocesses with the model's own processor / open_clip transform.

Weights: ``RewardSpec.model`` None means the tiny offline weights the tiny_models stage wrote to
``<tiny_models>/rewards/<kind>/`` (:mod:`ppd_core.tiny.rewards`) in the real formats;
they go through the very same loaders, only the location differs. Before a weight file is loaded
its sha256 is checked against ``spec.sha256``, else the digest recorded when the tiny weights were
built, else :data:`PUBLISHED_SHA256`; a file with no known digest loads unchecked, and its digest
is still part of :meth:`Reward.identity`.
"""

from __future__ import annotations

import abc
import json
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ppd_core.config import RewardSpec
from ppd_core.errors import RewardError
from ppd_core.weights import resolve_device, weight_file_sha256

TINY_DIR = "rewards"  # under the tiny_models output: rewards/<kind>/
TINY_RECORD = "reward.json"  # {"model", "processor", "sha256"} of one tiny reward, paths relative to its dir
BATCH_SIZE = 64  # images per forward: bounds memory whatever N is
CLIP_MAX_LENGTH = 77
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # one-file HF checkpoints, preferred first
# image_reward with model None: the released checkpoint (there is no tiny ImageReward)
IMAGE_REWARD_DEFAULT = "THUDM/ImageReward/ImageReward.pt"

# sha256 of published weight files: the Hugging Face Git LFS oid, keyed by "org/repo/file" (hub files) or
# by a distinctive file name (hub or local). Only digests read in a source are listed.
PUBLISHED_SHA256: dict[str, str] = {
    # huggingface.co/xswu/HPSv2 commit 697403c78157020a1ae59d23f111aa58ced35b0a ("Upload 2 files", LFS pointers)
    "HPS_v2_compressed.pt": "07cb0d20626232204ca3a6ec53ff5984e7e53212a8a7b0e0ec2bac1bdaf125a1",
    "HPS_v2.1_compressed.pt": "c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837",
    # LFS details of huggingface.co/trl-lib/ddpo-aesthetic-predictor/blob/main/aesthetic-model.pth (a renamed copy)
    # and of huggingface.co/haor/aesthetics commit 60617cce14f355d3923a0e320c9b616fc32ad36d; 3,714,759 bytes
    "sac+logos+ava1-l14-linearMSE.pth": "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth": (
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    ),
    # huggingface.co/yuvalkirstain/PickScore_v1/blob/a4e4367c6dfa7288a00c550414478f865b875800/model.safetensors
    "yuvalkirstain/PickScore_v1/model.safetensors": (
        "ef31ef6fc5ff4d9bb90dd232df4e145887ba62c5a03aa2841415f8c25f18d52e"
    ),
    # huggingface.co/yuvalkirstain/PickScore_v1/blob/4811ca826eb529163dc0e072e1d26dcb85f9fd95/pytorch_model.bin
    "yuvalkirstain/PickScore_v1/pytorch_model.bin": (
        "3f0cf1c6e533f478534404cb3ca6938103becbfe4312c6affc077c274a757972"
    ),
    # huggingface.co/THUDM/ImageReward commit 7a9e21fc5c7873859f160173d502cc82f6709e33; 1,786,880,927 bytes
    "ImageReward.pt": "d71dc8d4912bc633c06ab8ef1ef6a81e8199d4369f14b47b29baf1d19de561f6",
}

# processor / architecture a real checkpoint expects when spec.processor is None (clip_score: the model itself)
DEFAULT_PROCESSOR: dict[str, str] = {
    "pickscore": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "hps": "ViT-H-14",
    "aesthetic": "ViT-L-14:openai",
}
# what to write in `model` for the real weights (named in errors)
REAL_MODEL_EXAMPLE: dict[str, str] = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hps": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "aesthetic": "a local sac+logos+ava1-l14-linearMSE.pth",
    "clip_score": "openai/clip-vit-large-patch14",
}


class RewardUnavailable(RewardError):
    """The environment lacks what a reward needs (a package, the synthetic world): skipped, not a mistake."""


# ------------------------------------------------------------------------------------------ interface


class Reward(abc.ABC):
    """Scores (image, prompt[, user]) triples; higher is better."""

    per_user: bool = False  # True only for the world oracle: the score depends on the user

    def __init__(self, name: str, identity: dict) -> None:
        self.name = name  # the RewardSpec name
        self._identity = identity

    def identity(self) -> dict:
        """JSON-able: kind, model_id, weights_sha256 (and the settings that change the score)."""
        return dict(self._identity)

    def score(
        self, images: np.ndarray, prompts: Sequence[str], user_ids: Sequence[int] | None = None
    ) -> np.ndarray:
        """uint8 (N, H, W, 3) images, N prompts (and N user ids for a per-user reward) -> float64 (N,)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"reward {self.name}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        prompts = [str(p) for p in prompts]
        if len(prompts) != len(images):
            raise ValueError(f"reward {self.name}: {len(images)} images but {len(prompts)} prompts")
        users = None if user_ids is None else np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if users is not None and len(users) != len(images):
            raise ValueError(f"reward {self.name}: {len(images)} images but {len(users)} user ids")
        if self.per_user and users is None:
            raise RewardError(f"reward {self.name} scores a user's preference: pass user_ids")
        out = np.empty(len(images), dtype=np.float64)
        for start in range(0, len(images), BATCH_SIZE):
            rows = slice(start, start + BATCH_SIZE)
            batch_users = None if users is None else users[rows]
            out[rows] = self._score_batch(images[rows], prompts[rows], batch_users)
        return out

    @abc.abstractmethod
    def _score_batch(self, images: np.ndarray, prompts: list[str], user_ids: np.ndarray | None) -> np.ndarray:
        """At most BATCH_SIZE images (B, H, W, 3) -> scores (B,)."""


def verify_file(path: Path, expected: str | None, names: Iterable[str] = ()) -> str:
    """sha256 of ``path``; raises RewardError when it differs from ``expected`` or, when that is None,
    from the published digest of any of ``names`` (:data:`PUBLISHED_SHA256` keys)."""
    source = "the expected sha256"
    if expected is None:
        key = next((n for n in names if n in PUBLISHED_SHA256), None)
        expected, source = (PUBLISHED_SHA256[key], f"the published sha256 of {key}") if key else (None, "")
    actual = weight_file_sha256(path)
    if expected is not None and actual != expected.lower():
        raise RewardError(
            f"{path}: sha256 {actual} does not match {source} {expected.lower()} "
            "(a corrupt or different file: download it again, or set the reward's sha256 to accept it)"
        )
    return actual


def _images_to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img) for img in images]  # (H, W, 3) uint8 each


def _pixels(preprocess, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """open_clip inference transform of each image -> (B, 3, S, S) on ``device``."""
    return torch.stack([preprocess(Image.fromarray(img)) for img in images]).to(device)


def _unique(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts and, per row, the index of its prompt (each text is encoded once per batch)."""
    unique, inverse = np.unique(np.array(prompts, dtype=object), return_inverse=True)
    return [str(p) for p in unique], torch.from_numpy(inverse.astype(np.int64))


# ------------------------------------------------------------------------------------- synthetic world


def _load_world(world_dir: Path | None, spec: RewardSpec):
    """``world_dir`` is the synthesize stage's ``world/`` dir (or the synthesize output holding it)."""
    from ppd_core.data.world_render import WORLD_DIR, SyntheticWorld
    from ppd_core.embed.reference import world_digest

    if world_dir is None:
        raise RewardUnavailable(f"reward {spec.name} ({spec.kind}) needs the synthetic world (toy runs only)")
    path = Path(world_dir)
    root = path.parent if (path / "world.json").is_file() else path
    return SyntheticWorld.load(root), world_digest(root / WORLD_DIR)


class OracleReward(Reward):
    """The synthetic world's reward of the user: ``world.reward(user_id, image)``."""

    per_user = True

    def __init__(self, name: str, world, digest: str) -> None:
        super().__init__(
            name, {"kind": "oracle", "model_id": "synthetic-world:oracle", "weights_sha256": digest}
        )
        self.world = world

    def _score_batch(self, images, prompts, user_ids):
        out = np.empty(len(images), dtype=np.float64)
        for user in np.unique(user_ids):
            rows = user_ids == user
            if int(user) not in self.world.user_ids:
                raise RewardError(f"reward {self.name}: user {int(user)} is not in the synthetic world")
            out[rows] = self.world.reward(int(user), images[rows])
        return out


class AttributeReward(Reward):
    """One z-scored attribute of the synthetic world, measured from pixels (prompt and user ignored)."""

    def __init__(self, name: str, world, digest: str, attribute: str) -> None:
        from ppd_core.data.world_render import ATTRIBUTES

        if attribute not in ATTRIBUTES:
            raise RewardError(
                f"reward {name}: unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}"
            )
        identity = {
            "model_id": f"synthetic-world:{attribute}",
            "weights_sha256": digest,
            "attribute": attribute,
        }
        super().__init__(name, {"kind": "oracle_attribute", **identity})
        self.world, self.column = world, ATTRIBUTES.index(attribute)

    def _score_batch(self, images, prompts, user_ids):
        return self.world.attributes(images)[:, self.column]  # (B, A) -> (B,)


# --------------------------------------------------------------------------------- HF CLIP: PickScore


def _features(output) -> torch.Tensor:
    """transformers 5 returns BaseModelOutputWithPooling from get_*_features; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipReward(Reward):
    """A transformers ``CLIPModel`` + processor: PickScore (logit_scale.exp() * cos) or CLIP score
    (100 * max(cos, 0))."""

    def __init__(self, name: str, kind: str, model, processor, device: torch.device, identity: dict) -> None:
        super().__init__(name, identity)
        self.kind, self.model, self.processor, self.device = kind, model.eval(), processor, device

    @torch.no_grad()
    def _score_batch(self, images, prompts, user_ids):
        pixels = self.processor(images=_images_to_pil(images), return_tensors="pt")["pixel_values"]
        texts, index = _unique(prompts)
        tokens = self.processor(
            text=texts, padding=True, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
        )
        image = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (B, D)
        text = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )  # (T, D)
        cos = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)[index]).sum(-1)  # (B,)
        if self.kind == "pickscore":
            return (self.model.logit_scale.exp().float() * cos).double().cpu().numpy()
        return (100.0 * cos.clamp(min=0)).double().cpu().numpy()


def _looks_local(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()


def _hub(fetch, what: str):
    try:
        return fetch()
    except Exception as e:  # offline, unknown repo or file, no permission: all end here
        raise RewardError(f"cannot fetch {what} from the Hugging Face Hub: {e}") from e


def resolve_hf_model(model: str) -> tuple[Path, Path, list[str]]:
    """A local HF model dir or a hub id -> (local dir, its one weight file, digest table keys)."""
    path = Path(model).expanduser()
    if path.is_dir():
        for weight in HF_WEIGHT_NAMES:
            if (path / weight).is_file():
                return path, path / weight, []
        raise RewardError(f"{path} holds no one-file HF checkpoint ({' or '.join(HF_WEIGHT_NAMES)})")
    if _looks_local(model) or model.count("/") != 1:
        raise RewardError(f"model {model!r} is neither a local HF model directory nor a hub id 'org/name'")
    from huggingface_hub import snapshot_download

    for weight in HF_WEIGHT_NAMES:
        patterns = ["*.json", "*.txt", weight]
        local = Path(_hub(lambda p=patterns: snapshot_download(model, allow_patterns=p), model))
        if (local / weight).is_file():
            return local, local / weight, [f"{model}/{weight}"]
    raise RewardError(f"hub model {model} has no one-file checkpoint ({' or '.join(HF_WEIGHT_NAMES)})")


def _load_hf_clip(spec: RewardSpec, src: _Source, device: torch.device) -> HFClipReward:
    from transformers import AutoProcessor, CLIPModel

    directory, weights, keys = resolve_hf_model(src.model)
    digest = verify_file(weights, src.sha256, keys)
    processor_id = src.processor or str(directory)
    try:
        processor = AutoProcessor.from_pretrained(processor_id)
    except (OSError, ValueError) as e:
        raise RewardError(f"reward {spec.name}: cannot load the processor {processor_id!r}: {e}") from e
    model = CLIPModel.from_pretrained(directory).to(device)
    identity = {
        "kind": spec.kind,
        "model_id": src.model_id,
        "weights_sha256": digest,
        "processor": src.processor_id,
    }
    return HFClipReward(spec.name, spec.kind, model, processor, device, identity)


# -------------------------------------------------------------------------------------- open_clip: HPS


def resolve_weight_file(model: str) -> tuple[Path, list[str]]:
    """A local weight file or ``org/repo/file`` on the hub -> (local file, digest table keys)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path, [path.name]
    parts = model.split("/", 2)
    if _looks_local(model) or len(parts) < 3:
        raise RewardError(
            f"weight file {model!r} not found (give a local file or 'org/repo/file' on the hub)"
        )
    from huggingface_hub import hf_hub_download

    repo, filename = f"{parts[0]}/{parts[1]}", parts[2]
    local = _hub(lambda: hf_hub_download(repo, filename), model)
    return Path(local), [model, Path(filename).name]


def _open_clip_arch(processor: str) -> str:
    """An open_clip architecture: a built-in name, or a local dir (``local-dir:`` or a path) with its config."""
    import open_clip

    bare = processor.removeprefix("local-dir:")
    if processor.startswith("local-dir:") or Path(bare).is_dir():
        if not (Path(bare) / "open_clip_config.json").is_file():
            raise RewardError(f"{bare} is not an open_clip architecture directory (no open_clip_config.json)")
        return "local-dir:" + str(Path(bare).resolve())
    if processor.replace("/", "-") not in open_clip.list_models():
        raise RewardError(f"unknown open_clip architecture {processor!r} (see open_clip.list_models())")
    return processor


class HPSReward(Reward):
    """HPS v2 / v2.1: open_clip model with the HPS checkpoint, 100 * cos(image, text)."""

    def __init__(self, name: str, model, preprocess, tokenizer, device: torch.device, identity: dict) -> None:
        super().__init__(name, identity)
        self.model, self.preprocess, self.tokenizer, self.device = model.eval(), preprocess, tokenizer, device

    @torch.no_grad()
    def _score_batch(self, images, prompts, user_ids):
        pixels = _pixels(self.preprocess, images, self.device)  # (B, 3, S, S)
        texts, index = _unique(prompts)
        image = self.model.encode_image(pixels, normalize=True).float()  # (B, D)
        text = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()  # (T, D)
        return (100.0 * (image * text[index]).sum(-1)).double().cpu().numpy()


def _load_hps(spec: RewardSpec, src: _Source, device: torch.device) -> HPSReward:
    import open_clip

    checkpoint, keys = resolve_weight_file(src.model)
    digest = verify_file(checkpoint, src.sha256, keys)
    arch = _open_clip_arch(src.processor or DEFAULT_PROCESSOR["hps"])
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    try:  # reads {"state_dict": ...}, strips "module.", loads strictly
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    except (RuntimeError, KeyError) as e:
        raise RewardError(
            f"reward {spec.name}: {checkpoint} does not fit the architecture {arch}: {e}"
        ) from e
    identity = {
        "kind": "hps",
        "model_id": src.model_id,
        "weights_sha256": digest,
        "processor": src.processor_id,
    }
    return HPSReward(spec.name, model, preprocess, open_clip.get_tokenizer(arch), device, identity)


# ---------------------------------------------------------------------------------- LAION aesthetic v2


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP: Linear-Dropout(0.2)-Linear-Dropout(0.2)-Linear-Dropout(0.1)-
    Linear-Linear, no activations. ``widths`` = (input, 1024, 128, 64, 16) in the released file."""

    KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

    def __init__(self, widths: Sequence[int] = (768, 1024, 128, 64, 16)) -> None:
        super().__init__()
        w = list(widths)
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.2),
            nn.Linear(w[2], w[3]),
            nn.Dropout(0.1),
            nn.Linear(w[3], w[4]),
            nn.Linear(w[4], 1),
        )

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)  # (B, D) -> (B,)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "state dict") -> AestheticMLP:
        """Widths are read from the weights, so a tiny MLP on a tiny CLIP loads like the real one."""
        if not isinstance(state, dict) or set(state) != set(cls.KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise RewardError(
                f"{source} is not an aesthetic-predictor MLP (keys {list(cls.KEYS)}, got {got})"
            )
        widths = [state[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)]
        mlp = cls(widths)
        mlp.load_state_dict(state)
        return mlp


class AestheticReward(Reward):
    """LAION aesthetic v2: MLP(normalize(CLIP image embedding)); the prompt is ignored."""

    def __init__(
        self, name: str, clip, preprocess, mlp: AestheticMLP, device: torch.device, identity: dict
    ) -> None:
        super().__init__(name, identity)
        self.clip, self.preprocess, self.mlp, self.device = (
            clip.eval(),
            preprocess,
            mlp.eval().to(device),
            device,
        )

    @torch.no_grad()
    def _score_batch(self, images, prompts, user_ids):
        pixels = _pixels(self.preprocess, images, self.device)  # (B, 3, S, S)
        embeddings = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)  # (B, D)
        return self.mlp(embeddings).double().cpu().numpy()


def _embedding_width(clip) -> int:
    """Image embedding width of an open_clip model (one blank image tells, whatever the tower)."""
    size = clip.visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        blank = torch.zeros(1, 3, *size, device=next(clip.parameters()).device)
        return int(clip.encode_image(blank).shape[-1])


def _load_aesthetic(spec: RewardSpec, src: _Source, device: torch.device) -> AestheticReward:
    import open_clip

    from ppd_core.embed.clip import resolve_clip_source

    path, keys = resolve_weight_file(src.model)
    digest = verify_file(path, src.sha256, keys)
    mlp = AestheticMLP.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
    clip_src = resolve_clip_source(src.processor or DEFAULT_PROCESSOR["aesthetic"], None)
    clip, _, preprocess = open_clip.create_model_and_transforms(
        clip_src.model_name, pretrained=clip_src.pretrained, device=device
    )
    width = _embedding_width(clip)
    if width != mlp.input_size:
        raise RewardError(
            f"reward {spec.name}: the MLP {path} expects {mlp.input_size}-d embeddings but the CLIP "
            f"{clip_src.model_id} gives {width}-d (the released MLP needs ViT-L-14:openai)"
        )
    identity = {
        "kind": "aesthetic",
        "model_id": src.model_id,
        "weights_sha256": digest,
        "processor": clip_src.model_id,
        "processor_sha256": clip_src.weights_digest,
    }
    return AestheticReward(spec.name, clip, preprocess, mlp, device, identity)


# ---------------------------------------------------------------------------------------- ImageReward


class ImageRewardReward(Reward):
    """THUDM ImageReward (BLIP + MLP), standardised as the package returns it."""

    def __init__(self, name: str, model, identity: dict) -> None:
        super().__init__(name, identity)
        self.model = model

    @torch.no_grad()
    def _score_batch(self, images, prompts, user_ids):
        pils = _images_to_pil(images)
        return np.array([float(self.model.score(p, im)) for p, im in zip(prompts, pils, strict=True)])


def _load_image_reward(spec: RewardSpec, src: _Source, device: torch.device) -> ImageRewardReward:
    try:
        import ImageReward as RM
    except ImportError:
        raise RewardUnavailable(
            f"reward {spec.name}: the ImageReward package is not installed (pip install image-reward)"
        ) from None
    name, digest = src.model, None
    if "/" in name or Path(name).expanduser().is_file():  # a weight file (local or hub): checked as all are
        path, keys = resolve_weight_file(name)
        name, digest = str(path), verify_file(path, src.sha256, keys)
    # else a name the package knows ("ImageReward-v1.0"): it downloads and loads the file itself, unchecked
    model = RM.load(name, device=str(device))
    identity = {"kind": "image_reward", "model_id": src.model_id, "weights_sha256": digest}
    return ImageRewardReward(spec.name, model, identity)


# --------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Source:
    """Where one reward's weights are: the same fields for real and tiny weights."""

    model: str  # local file/dir or hub id (HF dir for pickscore / clip_score, weight file otherwise)
    processor: str | None  # processor / architecture (None: the kind's default)
    sha256: str | None  # expected digest of the weight file (None: the published one, if known)
    model_id: str  # shown in identity(): the spec's string, or "tiny:<kind>"
    processor_id: str | None


def _source(spec: RewardSpec, tiny_models_dir: Path | None) -> _Source:
    if spec.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", spec.sha256):
        raise RewardError(f"reward {spec.name}: sha256 must be 64 hex digits, got {spec.sha256!r}")
    if spec.model is not None:
        processor = spec.processor or DEFAULT_PROCESSOR.get(spec.kind)
        return _Source(spec.model, processor, spec.sha256, spec.model, processor or spec.model)
    if spec.kind == "image_reward":
        return _Source(IMAGE_REWARD_DEFAULT, None, spec.sha256, IMAGE_REWARD_DEFAULT, None)
    example = REAL_MODEL_EXAMPLE[spec.kind]
    if tiny_models_dir is None:
        raise RewardError(
            f"reward {spec.name}: no model and no tiny models (run tiny_models, or set model: {example})"
        )
    directory = Path(tiny_models_dir) / TINY_DIR / spec.kind
    try:
        record = json.loads((directory / TINY_RECORD).read_text())
    except FileNotFoundError:
        raise RewardError(
            f"no tiny {spec.kind} reward under {directory} (rerun the tiny_models stage, or set model: {example})"
        ) from None
    processor = spec.processor or (str(directory / record["processor"]) if record.get("processor") else None)
    tiny_id = f"tiny:{spec.kind}"
    return _Source(
        str(directory / record["model"]),
        processor,
        spec.sha256 or record["sha256"],
        tiny_id,
        spec.processor or tiny_id,
    )


_MODEL_LOADERS = {
    "pickscore": _load_hf_clip,
    "clip_score": _load_hf_clip,
    "hps": _load_hps,
    "aesthetic": _load_aesthetic,
    "image_reward": _load_image_reward,
}


def load_reward(
    spec: RewardSpec, tiny_models_dir: Path | None = None, world_dir: Path | None = None, device: str = "cpu"
) -> Reward:
    """Build one reward. Raises RewardUnavailable (environment) or another PPDError (a mistake)."""
    if spec.reads_world:
        world, digest = _load_world(world_dir, spec)
        if spec.kind == "oracle":
            return OracleReward(spec.name, world, digest)
        if spec.attribute is None:
            raise RewardError(f"reward {spec.name}: oracle_attribute needs `attribute`")
        return AttributeReward(spec.name, world, digest, spec.attribute)

    return _MODEL_LOADERS[spec.kind](spec, _source(spec, tiny_models_dir), resolve_device(device))


_PROCESS_REWARDS: dict[tuple, Reward] = {}  # one loaded reward per (spec, dirs, device) in a process
_PROCESS_REWARDS_LOCK = threading.Lock()


def process_reward(
    spec: RewardSpec,
    tiny_models_dir: Path | None,
    world_dir: Path | None,
    device: str = "cpu",
    loaded: Reward | None = None,
) -> Reward:
    """This process's loaded reward of ``spec``, loaded on first use (a shard worker loads each reward it scores
    with once; ``loaded``: one the caller has already, which later calls in this process reuse)."""
    key = (spec.model_dump_json(), str(tiny_models_dir), str(world_dir), str(device))
    with _PROCESS_REWARDS_LOCK:
        if loaded is not None:
            _PROCESS_REWARDS[key] = loaded
        if key not in _PROCESS_REWARDS:
            _PROCESS_REWARDS[key] = load_reward(spec, tiny_models_dir, world_dir, device)
        return _PROCESS_REWARDS[key]


def release_process_rewards() -> None:
    """Drop this process's loaded rewards (:func:`process_reward`): a stage body calls it when its shards are
    done, so the models do not outlive the stage in the ``ppd`` process."""
    with _PROCESS_REWARDS_LOCK:
        _PROCESS_REWARDS.clear()


def load_rewards(
    specs: Iterable[RewardSpec],
    tiny_models_dir: Path | None = None,
    world_dir: Path | None = None,
    device: str = "cpu",
) -> tuple[list[Reward], dict[str, str]]:
    """Load every spec; return (loaded rewards, {name: reason} of those skipped for the environment:
    ImageReward not installed, no synthetic world). Any other problem raises."""
    loaded, skipped = [], {}
    for spec in specs:
        try:
            loaded.append(load_reward(spec, tiny_models_dir, world_dir, device))
        except RewardUnavailable as e:
            skipped[spec.name] = str(e)
    return loaded, skipped
