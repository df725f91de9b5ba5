"""Hypothesis settings for the property tests."""

from hypothesis import settings

# The property tests' examples per run under the ci profile: every example is a network
# drawn from fxprune.testing and put through the oracle (tests/helpers/oracle.py). Together they
# are 1,250 networks per CI run (the goal is at least 1,000). The counts follow each
# test's seconds per example measured on a 2-core machine (one torch thread): cnn 0.10-0.17,
# attention 0.23-0.30, recurrent 0.08-0.12, mixed 0.21-0.33 (a quieter and a busier run,
# the machine shared with other test runs), so the four tests take 3 to 4.5 minutes there,
# within a 6-minute budget. Other profiles give every test their own max_examples.
CI_EXAMPLES = {
    "cnn_dags": 400,
    "attention_blocks": 300,
    "recurrent_nets": 350,
    "mixed_nets": 200,
}


def property_settings(name: str, **kwargs) -> settings:
    """Hypothesis settings for the property test of strategy ``name``: its share of the
    CI budget under the ci profile, the profile's own ``max_examples`` otherwise."""
    if settings.get_current_profile_name() == "ci":
        kwargs.setdefault("max_examples", CI_EXAMPLES[name])
    return settings(**kwargs)
