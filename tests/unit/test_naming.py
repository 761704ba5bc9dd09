"""Folder rules (a user's `model_type`, refused with a reason) and names from the API or
Content-Disposition (reduced to one safe path component): SPEC §3."""
import pytest

from ipc.naming import (
    FolderError,
    alternate_filename,
    check_folder,
    fold_case,
    is_reserved_name,
    is_valid_model_type,
    model_type_from_api,
    part_filename,
    safe_filename,
)


@pytest.mark.parametrize("raw,expected", [
    ("model.safetensors", "model.safetensors"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\win.ini", "win.ini"),
    ("/abs/path.ckpt", "path.ckpt"),
    ("..", "model.bin"),
    ("", "model.bin"),
    ("a:b*c?.pt", "a_b_c_.pt"),
    ('x<y>|"z.bin', "x_y___z.bin"),
    ("CON.safetensors", "_CON.safetensors"),
    ("aux.tar.safetensors", "_aux.tar.safetensors"),
    ("com1", "_com1"),
    ("Lpt9 .txt", "_Lpt9 .txt"),
    ("console.safetensors", "console.safetensors"),
    ("  .hidden.  ", "hidden"),
    ("x\x00y.bin", "xy.bin"),
    ("x.safetensors\u200b", "x.safetensors"),
    ("evil\u202egnp.safetensors", "evilgnp.safetensors"),
    ("a\u2066b\u2069.pt", "ab.pt"),
    ("\ufeffbom.ckpt", "bom.ckpt"),
    ("x.safetensors.", "x.safetensors"),
    ("e\u0301.pt", "\u00e9.pt"),  # NFC
])
def test_safe_filename(raw, expected):
    assert safe_filename(raw) == expected


def test_long_names_are_cut_keeping_the_extension():
    name = safe_filename("é" * 300 + ".safetensors")
    assert name.endswith(".safetensors") and len(name.encode()) <= 200


@pytest.mark.parametrize("folder", [
    "checkpoint", "lora_v2-x", "Lora", "Stable-diffusion", "Lora/SDXL", "models/Stable-diffusion",
    "loras/civitai/Pony Diffusion", "embeddings", "Modèles", "a.b",
])
def test_folders_as_written_are_kept(folder):
    assert check_folder(folder) == folder
    assert is_valid_model_type(folder)


@pytest.mark.parametrize("folder, words", [
    ("", "empty"),
    ("   ", "empty"),
    ("..", "'..'"),
    ("Lora/../../x", "'..'"),
    ("Lora/./x", "'.'"),
    ("Lora//x", "empty"),
    ("Lora/", "empty"),
    ("/etc", "absolute"),
    ("C:/models", "absolute"),
    ("C:models", "absolute"),
    ("Lora\\SDXL", "'/'"),
    ("CON", "reserved"),
    ("con", "reserved"),
    ("Lora/nul.txt", "reserved"),
    ("aux.tar", "reserved"),
    ("COM1", "reserved"),
    ("Lora.", "ends in a dot"),
    ("Lora ", "ends in a dot or a space"),
    ("Lo\u202era", "U+202E"),
    ("Lora\u200b", "U+200B"),
    ("Lo\tra", "U+0009"),
    ("Lo\x00ra", "U+0000"),
    ("Lo\u00a0ra", "U+00A0"),
    ("Lo\u3164ra", "U+3164"),
    ("Lo:ra", "Windows does not allow"),
    ("Lo*ra", "Windows does not allow"),
    ("x" * 201, "longer than"),
    ("/".join(["a"] * 17), "levels"),
    (None, "expected a folder"),
    (3, "expected a folder"),
])
def test_hostile_folders_are_refused_naming_the_component(folder, words):
    with pytest.raises(FolderError, match=None) as info:
        check_folder(folder)
    assert words in str(info.value), str(info.value)
    assert not is_valid_model_type(folder)


def test_the_error_names_the_component():
    with pytest.raises(FolderError) as info:
        check_folder("Lora/SDXL/CON/x")
    assert "'CON'" in str(info.value) and "Lora/SDXL/CON/x" in str(info.value)


def test_reserved_names_and_case_folding():
    assert is_reserved_name("CON") and is_reserved_name("aux.tar.gz") and is_reserved_name("nul ")
    assert not is_reserved_name("console") and not is_reserved_name("auxiliary.pt")
    assert fold_case("Lora/Model.safetensors") == fold_case("lora/model.SAFETENSORS")


def test_model_type_from_api():
    assert model_type_from_api("TextualInversion") == "textualinversion"
    assert model_type_from_api("Motion Module") == "motion_module"
    assert is_valid_model_type(model_type_from_api("../../Evil Type"))


def test_alternate_and_part_names():
    assert alternate_filename("m.safetensors", 57618) == "m_57618.safetensors"
    assert alternate_filename("m.safetensors", 57618, 3) == "m_57618_3.safetensors"
    assert part_filename("m.safetensors") == ".m.safetensors.part"
