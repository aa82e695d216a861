"""Fine-tuning jobs: parameters, the state machine and its events, naming, creation and cancel."""
