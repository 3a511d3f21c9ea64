"""Operator tooling: the PKI, broker configuration, device bundles and the local plant.

Tooling may import every part of millrace (contract, edge, cloud); nothing imports it back
except the CLI. It is not shipped to gateways.
"""
