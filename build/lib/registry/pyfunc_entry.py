"""MLflow models-from-code entry point: logged as the pyfunc model's code, so nothing is pickled."""

from mlflow.models import set_model

from registry.pyfunc_model import LanternImageModel

set_model(LanternImageModel())
