"""Text ModelServerConfig parsing and version policies: plain decision code, no TensorFlow runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.flags import parse_flags
from backend.model_config import (
    ModelConfigError,
    parse_model_config,
    read_model_config_file,
    single_model,
)
from backend.version_policy import VersionPolicy, version_directories, versions_to_unload


def test_parses_policies_labels_and_paths() -> None:
    (a, b, c, d) = parse_model_config("""
        model_config_list {
          config { name: "a" base_path: "/models/a" model_platform: "tensorflow" }
          config { name: "b" base_path: "/models/b" model_version_policy { latest { num_versions: 2 } } }
          config { name: "c" base_path: "/models/c" model_version_policy { all {} } }
          config { name: "d" base_path: "rel/d" model_version_policy { specific { versions: 1 versions: 3 } }
                   version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 } }
        }""")
    assert (a.name, a.base_path, a.policy) == ("a", Path("/models/a"), VersionPolicy("latest", 1))
    assert b.policy == VersionPolicy("latest", 2)
    assert c.policy.kind == "all"
    assert d.policy == VersionPolicy("specific", versions=frozenset({1, 3}))
    assert dict(d.labels) == {"stable": 1, "canary": 3}
    assert d.base_path.is_absolute()


@pytest.mark.parametrize("text, message", [
    ("model_config_list { config { name: 'a' } }", "has no base_path"),
    ("model_config_list { config { base_path: '/a' } }", "has no name"),
    ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'onnx' } }", "not supported"),
    ("model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }",
     "configured twice"),
    ("model_config_list { config { name: 'a' base_path: '/a' nope: 1 } }", "nope"),
    ("model_config_list { config { name: 'a' base_path: '/a' version_labels { key: '7' value: 1 } } }",
     "non-numeric"),
    ("model_config_list { config { name: 'a' base_path: '/a' model_version_policy { specific {} } } }",
     "lists no version"),
])
def test_bad_configs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        parse_model_config(text)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="cannot read model config file"):
        read_model_config_file(tmp_path / "absent.config")


def test_single_model_from_flags() -> None:
    (model,) = single_model(parse_flags(["--model_name=m", "--model_base_path=/models/m"]))
    assert (model.name, model.base_path, model.policy) == ("m", Path("/models/m"), VersionPolicy())


@pytest.mark.parametrize("policy, on_disk, expected", [
    (VersionPolicy("latest", 1), [1, 2, 10], {10}),
    (VersionPolicy("latest", 2), [1, 2, 10], {2, 10}),
    (VersionPolicy("latest", 5), [3], {3}),
    (VersionPolicy("all"), [1, 2], {1, 2}),
    (VersionPolicy("specific", versions=frozenset({1, 7})), [1, 2, 3], {1}),
    (VersionPolicy("latest", 1), [], set()),
])
def test_policy_selects_versions(policy: VersionPolicy, on_disk: list[int], expected: set[int]) -> None:
    assert policy.select(on_disk) == expected


@pytest.mark.parametrize("desired, available, expected", [
    ({2}, {1, 2}, {1}),          # the new version serves: the old one goes
    ({2}, {1}, set()),           # the new one is not serving (loading or failed): keep the old
    (set(), {1}, set()),         # base path emptied: keep serving what we have
    ({1, 2}, {1, 2}, set()),
    ({3}, {1, 2, 3}, {1, 2}),
])
def test_unload_only_once_a_wanted_version_serves(desired: set[int], available: set[int],
                                                   expected: set[int]) -> None:
    assert versions_to_unload(frozenset(desired), frozenset(available)) == expected


def test_the_example_config_parses() -> None:
    names = [model.name for model in read_model_config_file(Path(__file__).parent.parent / "configs/models.config")]
    assert names == ["half_plus_two", "mlp"]


@pytest.mark.parametrize("names, versions, clashes", [
    (["1", "2", "10"], {1: "1", 2: "2", 10: "10"}, []),
    (["0007", "abc", "-1", "+2", " 3", "4 ", "1e3", "", "\u00b2", "\u0661"], {7: "0007"}, []),
    (["9223372036854775807", "9223372036854775808"], {2**63 - 1: "9223372036854775807"}, []),
    (["7", "0007", "007"], {7: "7"}, [(7, "007", "0007"), (7, "7", "007")]),
])
def test_version_directories_as_tf_serving_reads_them(names: list[str], versions: dict[int, str],
                                                     clashes: list[tuple[int, str, str]]) -> None:
    assert version_directories(names) == (versions, clashes)
