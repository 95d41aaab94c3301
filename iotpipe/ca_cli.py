"""``iotpipe ca init|issue``: a local CA for device client certificates and broker server ones.

The certificates are made by :mod:`iotpipe.ca`; ``iotpipe edge flash --client-cert CA_DIR``
issues a device's certificate straight onto its card. docs/broker.md "Certificates".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iotpipe.errors import ConfigError

__all__ = ["app", "init", "issue"]

app = typer.Typer(
    name="ca",
    help="A local certificate authority: client certificates for devices, server ones for brokers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CaDir = Annotated[
    Path,
    typer.Argument(
        metavar="CA_DIR",
        help="The CA's directory (ca.key, ca.crt).",
        show_default=False,
        file_okay=False,
    ),
]


@app.command("init")
def init(
    directory: CaDir,
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = "iotpipe CA",
) -> None:
    """Create a CA: CA_DIR/ca.key (0600, keep it offline) and CA_DIR/ca.crt (give it to everyone).

    An existing CA is never replaced.

    [bold]Examples[/bold]

      iotpipe ca init ~/iotpipe-ca
    """
    from iotpipe.ca import init_ca

    cert = init_ca(directory, name)
    typer.echo(f"CA {name!r}: {cert} (public) and {directory / 'ca.key'} (secret, 0600)")


@app.command("issue")
def issue(
    directory: CaDir,
    client: Annotated[
        str | None,
        typer.Option(
            "--client",
            metavar="SITE/DEVICE",
            help="A device's client certificate; its common name is the device identity.",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        list[str] | None,
        typer.Option(
            "--server",
            metavar="HOST",
            help="A broker's server certificate for HOST (DNS name or IP; repeatable).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write OUT.crt and OUT.key (0600). \\[default: CA_DIR/issued/SITE.DEVICE or "
            "CA_DIR/issued/HOST]",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Issue a certificate signed by the CA: a device's client one, or a broker's server one.

    [bold]Examples[/bold]

      [dim]# the broker's TLS listener (Mosquitto: cafile, certfile, keyfile)[/dim]
      iotpipe ca issue ~/iotpipe-ca --server gateway.local --server 192.168.1.10

      [dim]# a device logging in by certificate (Mosquitto: require_certificate true,[/dim]
      [dim]# use_identity_as_username true); edge flash --client-cert does this for a card[/dim]
      iotpipe ca issue ~/iotpipe-ca --client home/pi-kitchen
    """
    from iotpipe.ca import issue_client, issue_server

    if (client is None) == (not server):
        raise ConfigError("--client", client, "give either --client SITE/DEVICE or --server HOST")
    if client is not None:
        issued = issue_client(directory, client)
        default = client.replace("/", ".")  # '.' is in no site or device name: no clash
    else:
        hosts = server or []
        issued = issue_server(directory, hosts)
        default = hosts[0]
    cert, key = issued.write(out or directory / "issued" / default)
    typer.echo(f"{cert} (certificate), {key} (private key, 0600; never printed)")
