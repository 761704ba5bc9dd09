"""Names from the API or Content-Disposition reduced to one safe path component."""
import pytest

from ipc.naming import alternate_filename, is_valid_model_type, model_type_from_api, part_filename, safe_filename


@pytest.mark.parametrize("raw,expected", [
    ("model.safetensors", "model.safetensors"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\win.ini", "win.ini"),
    ("/abs/path.ckpt", "path.ckpt"),
    ("..", "model.bin"),
    ("", "model.bin"),
    ("a:b*c?.pt", "a_b_c_.pt"),
    ("CON.safetensors", "_CON.safetensors"),
    ("  .hidden.  ", "hidden"),
    ("x\x00y.bin", "x_y.bin"),
])
def test_safe_filename(raw, expected):
    assert safe_filename(raw) == expected


def test_long_names_are_cut_keeping_the_extension():
    name = safe_filename("é" * 300 + ".safetensors")
    assert name.endswith(".safetensors") and len(name.encode()) <= 200


def test_model_type_rule():
    assert is_valid_model_type("checkpoint") and is_valid_model_type("lora_v2-x")
    for bad in ("LoRA", "a/b", "..", "", "x" * 65, None, 3):
        assert not is_valid_model_type(bad)
    assert model_type_from_api("TextualInversion") == "textualinversion"
    assert model_type_from_api("Motion Module") == "motion_module"
    assert is_valid_model_type(model_type_from_api("../../Evil Type"))


def test_alternate_and_part_names():
    assert alternate_filename("m.safetensors", 57618) == "m_57618.safetensors"
    assert alternate_filename("m.safetensors", 57618, 3) == "m_57618_3.safetensors"
    assert part_filename("m.safetensors") == ".m.safetensors.part"
