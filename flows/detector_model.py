"""MLflow "models from code" entry of the registered detector.

MLflow copies this file into every logged model and executes it on load; it only names the
``PythonModel`` to use. The model's artifacts (method state, config) are bound in ``load_context``.
"""

import mlflow.models

from flows.model_registry import ContadDetector

mlflow.models.set_model(ContadDetector())
