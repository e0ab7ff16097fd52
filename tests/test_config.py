"""The one strict loader (kedit.core.config) and the command line's --set, which feeds it."""

import pytest
from click.testing import CliRunner

from editing.hparams import MultiLayerHyperParams
from kedit.app.cli import cli
from kedit.core.config import ConfigError, flatten, from_mapping, load_yaml, with_overrides


def test_errors_name_the_source_and_the_dotted_key(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("layers: [1, 2]\ntargets:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"preset\.yaml: targets\.steps: input should be a valid integer, got 'many'"):
        load_yaml(MultiLayerHyperParams, path)
    with pytest.raises(ConfigError, match=r"<dict>: layers\[1\]: input should be a valid integer"):
        from_mapping(MultiLayerHyperParams, {"layers": [1, "2"]})
    with pytest.raises(ConfigError, match=r"layers: missing key"):
        from_mapping(MultiLayerHyperParams, {})
    path.write_text("layers: [1\n")
    with pytest.raises(ConfigError, match=r"preset\.yaml: invalid YAML"):
        load_yaml(MultiLayerHyperParams, path)


def test_overrides_are_dotted_and_a_whole_section_keeps_what_it_does_not_name():
    base = from_mapping(MultiLayerHyperParams, {"layers": [1], "targets": {"steps": 7, "lr": 0.1}})
    one = with_overrides(base, {"targets.steps": 5})
    assert (one.targets.steps, one.targets.lr) == (5, 0.1)
    whole = with_overrides(base, {"targets": {"steps": 5}})
    assert whole.targets == one.targets  # lr stays the preset's 0.1, not the class default
    assert base.targets.steps == 7  # frozen: the preset object itself is unchanged
    with pytest.raises(ConfigError, match=r"unknown key 'targets\.stepz'"):
        with_overrides(base, {"targets.stepz": 1})
    with pytest.raises(ConfigError, match=r"layers is not a section"):
        with_overrides(base, {"layers.x": 1})
    assert flatten(one)["targets.steps"] == 5 and flatten(one)["layers"] == [1]


def test_a_set_value_that_is_not_yaml_is_a_usage_error(tmp_path):
    feed = tmp_path / "f.jsonl"
    feed.write_text("")
    out = CliRunner().invoke(cli, ["stream", "--feed", str(feed), "--set", "targets.kl_prompt={} is a"])
    assert out.exit_code == 2 and "the value is not YAML" in out.output


def test_unknown_editor_and_format_are_refused_with_the_registry(tmp_path):
    feed = tmp_path / "f.jsonl"
    feed.write_text("")
    out = CliRunner().invoke(cli, ["stream", "--feed", str(feed), "--editor", "memitt"])
    assert out.exit_code == 2 and "unknown editor 'memitt'" in out.output and "rome" in out.output
    out = CliRunner().invoke(cli, ["check", str(feed), "--format", "csvv"])
    assert out.exit_code == 2 and "unknown format 'csvv'" in out.output and "counterfact" in out.output
