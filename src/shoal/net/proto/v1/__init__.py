"""Generated from proto/shoal/v1 by shoal.net.protogen; do not edit."""
