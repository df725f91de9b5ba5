"""Helpers the tests share: the oracle checks every pruned model goes through, healthy
activations for random models, criteria test networks, property-test settings."""
