from model_store.backbone import load_backbone
from model_store.store import Store
from training.common import accuracy
from training.data import read_cct


def test_pretrained_backbone_beats_chance_clearly(smoke_zoo_store, smoke_world):
    store = Store.open(smoke_zoo_store)
    metrics = store.load_json("pretrain/metrics.json")
    chance = 1 / len(store.manifest["classes"])
    assert metrics["seen_val_mean"] > chance + 0.3

    # The stored weights reproduce the recorded accuracy.
    model, config = load_backbone(store)
    dataset = read_cct(smoke_world)
    location = dataset.locations("seen")[0]
    recorded = metrics["seen_val_accuracy"][location]
    assert abs(accuracy(model, *dataset.load(location, "val", config.image_size), config) - recorded) < 1e-6
    assert store.manifest["components"]["pretrain"]["steps"] > 0
