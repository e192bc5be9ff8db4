"""End-to-end benchmark of msilo against Kamailio's msilo module (``python -m bench.e2e``)."""
