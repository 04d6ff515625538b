"""The project's Hydra plugins (Hydra imports every module of the hydra_plugins namespace): the Optuna sweeper."""
