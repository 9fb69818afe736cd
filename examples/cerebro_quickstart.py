"""Cerebro's quick start (docs/quick_start.md, examples/dummy_model_selection.py), run on cerebro_tasks.

Only the imports differ from Cerebro's script (``cerebro.*`` -> ``cerebro_tasks``), plus what Keras 3
itself renamed (``Adam(lr=)`` -> ``Adam(learning_rate=)``, ``Input(shape=692)`` -> ``shape=(692,)``,
``model.save`` needs a ``.keras`` name) and a small generated libsvm file instead of the downloaded
``sample_libsvm_data.txt``. Sizes are small so that it runs in about a minute on a laptop:

    python examples/cerebro_quickstart.py            # store in $CEREBRO_QUICKSTART_DIR or /tmp/cerebro_quickstart
    tensorboard --logdir /tmp/cerebro_quickstart/runs
"""

# --- the imports: the only lines that differ from a Cerebro script ----------------------------------
from cerebro_tasks import SparkBackend, SparkEstimator          # was: cerebro.backend / cerebro.keras
from cerebro_tasks import LocalStore, HDFSStore                  # was: cerebro.storage
from cerebro_tasks import GridSearch, RandomSearch, TPESearch    # was: cerebro.tune
from cerebro_tasks import hp_choice, hp_uniform, hp_quniform, hp_loguniform, hp_qloguniform  # was: cerebro.tune
# ------------------------------------------------------------------------------------------------------

import os

import numpy as np
import tensorflow as tf
from pyspark.sql import SparkSession

NUM_FEATURES = 64
PREFIX = os.environ.get("CEREBRO_QUICKSTART_DIR", "/tmp/cerebro_quickstart")


def write_sample_libsvm(path, rows=240, seed=0):
    """A small sparse binary problem in libsvm format (stands in for sample_libsvm_data.txt)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=NUM_FEATURES)
    with open(path, "w") as f:
        for _ in range(rows):
            idx = np.sort(rng.choice(NUM_FEATURES, size=12, replace=False))
            val = rng.normal(size=12)
            label = int(val @ truth[idx] > 0)
            f.write(f"{label} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in zip(idx, val)) + "\n")


spark = SparkSession \
    .builder \
    .appName("Cerebro Example") \
    .getOrCreate()

backend = SparkBackend(spark_context=spark.sparkContext, num_workers=2)
store = LocalStore(prefix_path=PREFIX)

# Initialize input DataFrames.
os.makedirs(PREFIX, exist_ok=True)
data_path = os.path.join(PREFIX, "sample_libsvm_data.txt")
write_sample_libsvm(data_path)
df = spark.read.format("libsvm").option("numFeatures", NUM_FEATURES).load(data_path).repartition(4)
train_df, test_df = df.randomSplit([0.8, 0.2], seed=1)


# Define estimator generating function.
# Input: Dictionary containing parameter values
# Output: SparkEstimator
def estimator_gen_fn(params):
    model = tf.keras.models.Sequential()
    model.add(tf.keras.layers.Input(shape=(NUM_FEATURES,), name='features'))
    model.add(tf.keras.layers.Dense(16))
    model.add(tf.keras.layers.Dense(1))
    model.add(tf.keras.layers.Activation('sigmoid'))

    optimizer = tf.keras.optimizers.Adam(learning_rate=params['lr'])
    loss = 'binary_crossentropy'

    estimator = SparkEstimator(
        model=model,
        optimizer=optimizer,
        loss=loss,
        metrics=['acc'],
        batch_size=params['batch_size'])

    return estimator


# Define dictionary containing the parameter search space.
search_space = {
    'lr': hp_choice([0.01, 0.001, 0.0001]),
    'batch_size': hp_quniform(16, 64, 16)
}

# Instantiate TPE (Tree of Parzan Estimators a.k.a., HyperOpt) model selection object.
model_selection = TPESearch(backend=backend, store=store, estimator_gen_fn=estimator_gen_fn, search_space=search_space,
                            num_models=3, num_epochs=1, validation=0.25, evaluation_metric='loss',
                            feature_columns=['features'], label_columns=['label'])

# Perform model selection. Returns best model.
model = model_selection.fit(train_df)

# Inspect best model training history.
model_history = model.get_history()

# Perform inference using the best model and Spark DataFrame.
output_df = model.set_output_columns(['label_predicted']).transform(test_df)
output_df.select('label', 'label_predicted').show(n=10)

# Access all models.
all_models = model.get_all_models()
all_model_training_history = model.get_all_model_history()

# Convert the best model to Keras and perform inference using numpy data.
keras_model = model.keras()
pred = keras_model.predict([np.ones([1, NUM_FEATURES], dtype=np.float32)])
# Save the keras checkpoint file.
keras_model.save(os.path.join(PREFIX, "best_model.keras"))

# Convert all the model to Keras.
all_models_keras = [m.keras() for m in all_models]
