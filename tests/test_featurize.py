import json

import numpy as np
import pytest

from molcloak.pipeline.errors import FeaturizerError, InvalidSmilesError
from molcloak.pipeline.featurize import COUNT_CAP, FeaturizerSpec, featurize, fit_featurizer, raw_features

TRAIN = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCCCCCCC", "OC(=O)c1ccccc1"]


def test_parse_and_str_round_trip():
    spec = FeaturizerSpec.parse("physchem+morgan:r=3,n=512+morgan_count:r=2,n=64")
    assert str(spec) == "physchem+morgan:r=3,n=512+morgan_count:r=2,n=64"
    assert spec.width == 10 + 512 + 64
    assert FeaturizerSpec.parse(str(spec)) == spec


def test_dict_round_trip_through_json_keeps_scaler():
    spec = fit_featurizer(FeaturizerSpec.parse("physchem+morgan:r=2,n=64"), TRAIN)
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert np.array_equal(featurize(again, TRAIN), featurize(spec, TRAIN))


def test_featurization_is_deterministic():
    spec = fit_featurizer(FeaturizerSpec.parse("physchem+morgan_count:r=2,n=128"), TRAIN)
    a, b = featurize(spec, TRAIN), featurize(spec, list(TRAIN))
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_standardization_on_descriptors_not_on_bits():
    spec = fit_featurizer(FeaturizerSpec.parse("physchem+morgan:r=2,n=64"), TRAIN)
    X = featurize(spec, TRAIN)
    assert np.allclose(X[:, :10].mean(axis=0), 0, atol=1e-5)
    assert set(np.unique(X[:, 10:])) <= {0.0, 1.0}


def test_counts_are_capped():
    X = raw_features(FeaturizerSpec.parse("morgan_count:r=1,n=32"), ["C" * 40])
    assert X.max() == COUNT_CAP


@pytest.mark.parametrize("text,match", [
    ("fingerprints", "unknown feature part 'fingerprints'"),
    ("morgan:x=2", "feature option 'x=2'"),
    ("morgan:r=9,n=64", "radius 9 / size 64 out of range"),
    ("", "empty feature spec"),
])
def test_bad_specs(text, match):
    with pytest.raises(FeaturizerError, match=match):
        FeaturizerSpec.parse(text)


def test_invalid_smiles_is_named():
    spec = fit_featurizer(FeaturizerSpec.parse("physchem"), TRAIN)
    with pytest.raises(InvalidSmilesError, match=r"molecule 2: SMILES 'C1CC' could not be parsed"):
        featurize(spec, ["CCO", "C1CC"])


def test_unfitted_spec_is_refused():
    with pytest.raises(FeaturizerError, match="not fitted"):
        featurize(FeaturizerSpec.parse("physchem"), TRAIN)
