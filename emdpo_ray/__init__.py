"""EM-DPO on Ray: one DPO policy per latent user type, served behind a min-max-regret router."""

__version__ = "0.1.0"
