//! An MQTT 5 test client (rumqttc) whose events arrive on a channel, so tests can wait for exactly
//! the packet they expect.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;

pub const SOON: Duration = Duration::from_secs(10);

pub struct TestClient {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a client connects.
#[derive(Default, Clone)]
pub struct Login {
    pub client_id: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub will: Option<(String, Vec<u8>)>,
}

impl Login {
    pub fn as_device(id: &str, password: Option<&str>) -> Self {
        Self { client_id: id.into(), user: Some(id.into()), password: password.map(Into::into), will: None }
    }
}

impl TestClient {
    /// Connects and waits for the CONNACK; `Err` with the refusal when refused.
    pub async fn connect(broker: SocketAddr, login: Login) -> Result<Self, String> {
        Self::connect_with(broker, login, |_| {}).await
    }

    pub async fn connect_with(
        broker: SocketAddr,
        login: Login,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> Result<Self, String> {
        let mut options = MqttOptions::new(login.client_id.clone(), broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(Some(16 << 20));
        if let Some(user) = &login.user {
            options.set_credentials(user.clone(), login.password.clone().unwrap_or_default());
        }
        if let Some((topic, payload)) = &login.will {
            options.set_last_will(LastWill::new(
                topic.clone(),
                payload.clone(),
                QoS::AtLeastOnce,
                true,
                None,
            ));
        }
        configure(&mut options);
        let (client, mut event_loop) = AsyncClient::new(options, 100);
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if sender.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(error) => {
                        let text = match &error {
                            ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                            other => other.to_string(),
                        };
                        let _ = sender.send(Err(text));
                        return;
                    }
                }
            }
        });
        let mut client = Self { client, events, task };
        match client.next().await {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(client),
            Ok(other) => Err(format!("{other:?}")),
            Err(error) => Err(error),
        }
    }

    /// The next packet from the broker (or the connection error).
    pub async fn next(&mut self) -> Result<Packet, String> {
        tokio::time::timeout(SOON, self.events.recv())
            .await
            .expect("a packet within the time limit")
            .unwrap_or_else(|| Err("the event loop ended".into()))
    }

    /// The next packet within `wait`, if any.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Result<Packet, String>> {
        tokio::time::timeout(wait, self.events.recv()).await.ok().flatten()
    }

    /// The next packet that is not a ping response.
    pub async fn next_significant(&mut self) -> Result<Packet, String> {
        loop {
            match self.next().await {
                Ok(Packet::PingResp(_)) => continue,
                other => return other,
            }
        }
    }

    /// Publishes with QoS 1 and returns the broker's PUBACK.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> rumqttc::v5::mqttbytes::v5::PubAck {
        self.publish_with(topic, payload, PublishProperties::default()).await
    }

    pub async fn publish_with(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        properties: PublishProperties,
    ) -> rumqttc::v5::mqttbytes::v5::PubAck {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .await
            .expect("queued");
        match self.next_significant().await {
            Ok(Packet::PubAck(ack)) => ack,
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH from the broker.
    pub async fn next_publish(&mut self) -> Publish {
        match self.next_significant().await {
            Ok(Packet::Publish(publish)) => publish,
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }
}
