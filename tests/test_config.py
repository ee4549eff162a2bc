"""The config tree: sources and precedence, clear errors, fingerprints."""

from pathlib import Path

import pytest

from ppd_core.config import PPDConfig, fingerprint, load_config
from ppd_core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config(CONFIGS / preset, environ={})
    assert cfg.fewshot.shots == 4


def test_toy_preset_equals_code_defaults():
    assert load_config(CONFIGS / "toy.yaml", environ={}) == PPDConfig()


def test_precedence_defaults_file_env_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("fewshot: {seed: 1, shots: 3}\nworld: {num_users: 10}\n")
    env = {"PPD_FEWSHOT__SEED": "2", "PPD_WORLD__NUM_USERS": "11", "OTHER": "x"}
    cfg = load_config(preset, ["fewshot.seed=3"], environ=env)
    assert cfg.fewshot.seed == 3  # --set beats env beats file
    assert cfg.world.num_users == 11  # env beats file
    assert cfg.fewshot.shots == 3  # file beats default
    assert cfg.fewshot.max_sets_per_user == 20  # default


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["fewshot.seeed=1"], "fewshot.seeed: unknown key"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["world.num_users=many"], "world.num_users"),
        (["fewshot.unseen_fraction=1.5"], "fewshot.unseen_fraction"),
        (["ingest.images=sometimes"], "ingest.images"),
        (["world.shift_min=5"], "shift_min must be <= shift_max"),
        (["world.quirks.tie=0.7", "world.quirks.unlabeled=0.5"], "quirk rates add up to 1.2"),
        (["relabel.rewards=[brightness, hps]"], "relabel.rewards names 'hps', not one of evaluate.rewards"),
        (["relabel.rewards=[oracle]"], "the per-user oracle"),
        (["relabel.rewards=[size, size]"], "relabel.rewards names must be unique"),
    ],
)
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, environ={})
    assert needle in str(e.value)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("fewshot: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})


def test_override_values_are_typed():
    cfg = load_config(
        None, ["ingest.formats=[JPEG]", "ingest.source=null", "world.quirks.tie=0.5"], environ={}
    )
    assert cfg.ingest.formats == ("JPEG",)
    assert cfg.ingest.source is None
    assert cfg.world.quirks.tie == 0.5


def test_config_is_frozen():
    cfg = PPDConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen assignment
        cfg.fewshot.seed = 5


def test_fingerprint_ignores_volatile_fields_only():
    a = load_config(None, environ={})
    b = load_config(None, ["ingest.batch_rows=7", "run.root=/elsewhere"], environ={})
    c = load_config(None, ["ingest.image_check=full"], environ={})
    assert fingerprint("ingest", a.ingest) == fingerprint("ingest", b.ingest)
    assert fingerprint("ingest", a.ingest) != fingerprint("ingest", c.ingest)
    assert fingerprint("ingest", a.ingest, {"synthesize": "d1"}) != fingerprint(
        "ingest", a.ingest, {"synthesize": "d2"}
    )
    assert fingerprint("ingest", a.ingest, code_version="1") != fingerprint(
        "ingest", a.ingest, code_version="2"
    )


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("pickapic_*.yaml")))
def test_real_data_presets_evaluate_and_relabel_with_real_weights(preset):
    from ppd_core.pipeline import upstream_of
    from ppd_core.rewards.relabel import needs_tiny_models, needs_world

    cfg = load_config(CONFIGS / preset, environ={})
    specs = cfg.relabel_rewards()
    assert [s.name for s in specs] == ["clip-score", "aesthetic", "hps"]  # the paper's reward users
    assert not needs_world(specs) and not needs_tiny_models(specs)
    assert upstream_of("relabel", cfg) == ("ingest",)  # no tiny offline weights, no synthetic world
    tiny = [r.name for r in cfg.evaluate.rewards if r.model is None and r.kind != "image_reward"]
    assert tiny == []  # every reward loads real weights
    judges = {j.name: j for j in cfg.evaluate.judges}
    assert judges[cfg.evaluate.primary_judge].kind == "vlm" and judges["vlm"].model
