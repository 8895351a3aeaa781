"""Entry point of the services artifact: `python3 fleet-services.pyz SERVICE -c CONFIG`."""

import argparse

from friesian_services import feature, inference, recall, recommender
from friesian_services.server import load_config

SERVICES = {"inference": inference.main, "feature": feature.main, "recall": recall.main,
            "recommender": recommender.main}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="friesian-services")
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("-c", "--config", required=True, help="the service's YAML config")
    args = parser.parse_args(argv)
    SERVICES[args.service](load_config(args.config))


if __name__ == "__main__":
    main()
