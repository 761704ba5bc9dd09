"""Which folder a model goes to when its entry names none: the `layout` of the program that reads
download_dir, and the user's per-type `folders` overrides (SPEC §2, README "Layouts").

Sources: ComfyUI's folder_paths.py (download_dir is ComfyUI's `models/`), AUTOMATIC1111/Forge's
own paths and sd-civitai-browser-plus's contenttype_folder() (download_dir is the webui folder),
as gathered in ../shared/civitai-api.md §2.3. Civitai adds types over time: an unknown type goes
where the layout puts "Other".
"""
from __future__ import annotations

from ipc.naming import model_type_from_api

LAYOUTS = ("plain", "comfyui", "a1111")

# Civitai's model types as /api/v1/enums lists them, and the newer ones of its database enum.
CIVITAI_TYPES = (
    "Checkpoint", "TextualInversion", "Hypernetwork", "AestheticGradient", "LORA", "LoCon", "DoRA",
    "Controlnet", "Upscaler", "MotionModule", "VAE", "Poses", "Wildcards", "Workflows", "Detection",
    "Other", "TextEncoder", "UNet", "CLIPVision", "ComfyWorkflows", "VisionLanguage", "CLIP", "LLM",
)

COMFYUI = {
    "Checkpoint": "checkpoints",
    "TextualInversion": "embeddings",
    "Hypernetwork": "hypernetworks",
    "AestheticGradient": "aesthetic_embeddings",
    "LORA": "loras",
    "LoCon": "loras",
    "DoRA": "loras",
    "Controlnet": "controlnet",
    "Upscaler": "upscale_models",
    "MotionModule": "animatediff_models",
    "VAE": "vae",
    "Poses": "poses",
    "Wildcards": "wildcards",
    "Workflows": "workflows",
    "ComfyWorkflows": "workflows",
    "Detection": "ultralytics",
    "TextEncoder": "text_encoders",
    "CLIP": "text_encoders",
    "UNet": "diffusion_models",
    "CLIPVision": "clip_vision",
    "VisionLanguage": "LLM",
    "LLM": "LLM",
    "Other": "other",
}

A1111 = {
    "Checkpoint": "models/Stable-diffusion",
    "TextualInversion": "embeddings",
    "Hypernetwork": "models/hypernetworks",
    "AestheticGradient": "extensions/stable-diffusion-webui-aesthetic-gradients/aesthetic_embeddings",
    "LORA": "models/Lora",
    "LoCon": "models/Lora",  # Forge and A1111 1.5+ read LyCORIS files from models/Lora
    "DoRA": "models/Lora",
    "Controlnet": "models/ControlNet",
    "Upscaler": "models/ESRGAN",
    "MotionModule": "extensions/sd-webui-animatediff/model",
    "VAE": "models/VAE",
    "Poses": "models/Poses",
    "Wildcards": "extensions/sd-dynamic-prompts/wildcards",
    "Workflows": "models/Workflows",
    "ComfyWorkflows": "models/Workflows",
    "Detection": "models/adetailer",
    "TextEncoder": "models/text_encoder",
    "CLIP": "models/text_encoder",
    "UNet": "models/Stable-diffusion",
    "CLIPVision": "models/clip_vision",
    "VisionLanguage": "models/LLM",
    "LLM": "models/LLM",
    "Other": "models/Other",
}

# A file of a version that is not the model itself has its own home (a checkpoint's VAE).
FILE_TYPE_AS_MODEL_TYPE = {"vae": "VAE", "text encoder": "TextEncoder", "unet": "UNet",
                           "diffusion model": "UNet", "clipvision": "CLIPVision", "controlnet": "Controlnet",
                           "upscaler": "Upscaler", "workflow": "Workflows", "negative": "TextualInversion"}

_CANONICAL = {name.lower(): name for name in CIVITAI_TYPES}


def canonical_type(api_type: object) -> str:
    """Civitai's spelling of a type named in any case ("lora" -> "LORA"); unknown types as given."""
    text = str(api_type or "Other").strip()
    return _CANONICAL.get(text.lower(), text)


def effective_type(api_type: object, file_type: object = None) -> str:
    """The type a file is placed as: a version's VAE file goes where VAEs go, not beside the
    checkpoint it came with."""
    mapped = FILE_TYPE_AS_MODEL_TYPE.get(str(file_type or "").strip().lower())
    return mapped or canonical_type(api_type)


def folder_for(api_type: object, layout: str = "plain", overrides: dict | None = None,
               file_type: object = None) -> str:
    """The folder (relative to download_dir) for a file of Civitai type `api_type`."""
    kind = effective_type(api_type, file_type)
    for key, folder in (overrides or {}).items():
        if canonical_type(key) == kind:
            return folder
    if layout == "comfyui":
        return COMFYUI.get(kind, COMFYUI["Other"])
    if layout == "a1111":
        return A1111.get(kind, A1111["Other"])
    return model_type_from_api(kind)


def layout_table(layout: str) -> dict[str, str]:
    """Every known type and its folder under `layout` (for the README and the GUI)."""
    return {kind: folder_for(kind, layout) for kind in CIVITAI_TYPES}
