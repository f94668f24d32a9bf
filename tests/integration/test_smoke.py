from tests.agentproc import AgentProcess
from tests.conftest import ClientFactory


async def test_ping_over_unix_and_tcp(agent: AgentProcess, checked_client: ClientFactory) -> None:
    for url in (agent.unix_url, agent.tcp_url):
        client = await checked_client(url)
        result = await client.call("Host.ping")
        assert result["time"] > 0
