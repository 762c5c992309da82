"""Talking to other stores: Nix's serve protocol, copy-closure and transports."""
