"""The links users paste, as the GUI, the API and the command line read them."""
import pytest

from ipc.links import parse_model_ref, parse_model_url


@pytest.mark.parametrize("text, expected", [
    ("4468", {"model_id": 4468}),
    ("v:73710", {"version_id": 73710}),
    ("version 73710", {"version_id": 73710}),
    ("https://civitai.com/models/4468", {"model_id": 4468}),
    ("https://civitai.com/models/4468/counterfeit-v30", {"model_id": 4468}),
    ("https://civitai.com/models/4468?modelVersionId=57618", {"model_id": 4468, "version_id": 57618}),
    ("https://civitai.red/models/4468?modelVersionId=57618", {"model_id": 4468, "version_id": 57618}),
    ("civitai.com/models/4468", {"model_id": 4468}),
    ("https://civitai.com/api/download/models/57618", {"version_id": 57618}),
    ("https://civitai.com/api/download/models/57618?fileId=3", {"version_id": 57618, "file_id": 3}),
    ("https://civitai.com/api/v1/model-versions/57618", {"version_id": 57618}),
    ("https://www.civitai.com/models/1/", {"model_id": 1}),
])
def test_links_users_paste(text, expected):
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text, words", [
    ("https://example.com/models/1", "civitai.com or civitai.red"),
    ("https://civitai.com/images/1", "not a Civitai model URL"),
    ("ftp://civitai.com/models/1", "http(s)"),
    ("https://civitai.com/models/1?modelVersionId=abc", "must be a number"),
    ("https://civitai.com.evil.test/models/1", "not civitai.com.evil.test"),
])
def test_what_is_not_a_model_link_says_why(text, words):
    with pytest.raises(ValueError) as err:
        parse_model_url(text)
    assert words in str(err.value)
