import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors everywhere in the suite: one intra-op thread avoids sync overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """(data prefix, tokenizer model) of a small stdlib dataset with a 512-token tokenizer,
    built once per session by the default-data pipeline."""
    from megaseg.data.default_data import DefaultDataSettings, prepare_default_data

    settings = DefaultDataSettings(vocab_size=512, tokenizer_train_chars=200_000, max_bytes=600_000)
    data = prepare_default_data(tmp_path_factory.mktemp("data"), settings, workers=1, log=lambda msg: None)
    return data.data_prefix, str(data.tokenizer_model)
