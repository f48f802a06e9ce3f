//! Modbus TCP meters behind a gateway (the seed's M-Bus to Modbus TCP gateways): discovery of
//! the meters in the gateway's slots, and reading them on the source's schedule.
//!
//! What the seed did and what this does instead (seed weakness 15):
//! - **Discovery** walks slots from 0 and stops at the first empty one (serial number 0 or all
//!   ones), as the seed did, or reads exactly the slots the config lists, so that a meter after
//!   a gap can be found. It runs at start, every `rediscover_every`, after `discovery_retry`
//!   when it could not finish or found nothing, and at the next poll when a slot's serial
//!   number changed (a meter was replaced). An answer "illegal data address" ends a walk (the
//!   gateway has no more slots); any other Modbus exception skips that slot only.
//! - **Every poll reads each meter's serial number with its values** (one request when they
//!   are close together), so a reading is never attributed to the meter that used to be in a
//!   slot.
//! - **One meter failing never drops another's readings**: each meter is read on its own; its
//!   errors are logged at most every few minutes ([`ErrorLog`]). Only when the gateway cannot
//!   be reached at all is the rest of the poll skipped.
//! - **One connection** ([`link::Link`]), kept across polls, opened again after an error.
//! - **Per-meter timestamps**: each meter's readings are stamped when its registers arrived,
//!   not when the poll started.
//! - **All 64 bits** of an energy register are read ([`maps::ChannelField::decode`]).

pub mod link;
pub mod maps;
pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use drover_protocol::reading::{MeterId, Reading};
use tokio::time::Instant;
use tokio_modbus::ExceptionCode;

use self::link::{Endpoint, Link, LinkError};
use self::maps::{RegisterMap, SlotRegisters};
use super::clock::Clock;
use super::config::ModbusSourceConfig;
use super::poll::{ErrorLog, Source};

/// A gateway and the meters found in its slots.
#[derive(Debug)]
pub struct ModbusSource {
    link: Link,
    map: RegisterMap,
    blocks: Vec<(u16, u16)>,
    slots: Slots,
    rediscover_every: Duration,
    discovery_retry: Duration,
    meters: Vec<Meter>,
    next_discovery: Instant,
    clock: Arc<dyn Clock>,
    errors: ErrorLog<String>,
}

/// Which slots discovery looks at.
#[derive(Debug, Clone)]
enum Slots {
    /// From 0 up to the first empty slot, at most this many.
    Walk(u16),
    /// Exactly these.
    List(Vec<u16>),
}

/// A meter found in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meter {
    slot: u16,
    serial: u64,
    id: MeterId,
}

/// What one discovery found out.
enum Discovered {
    /// Every slot could be read.
    Complete(Vec<Meter>),
    /// Some slots could not be read; these are the ones that could.
    Partial(Vec<Meter>),
    /// The gateway could not be reached or stopped answering.
    Failed,
}

impl ModbusSource {
    /// A source for `config`, with its map already resolved. Nothing is connected yet: the
    /// first poll connects and discovers.
    pub fn new(config: &ModbusSourceConfig, map: RegisterMap, clock: Arc<dyn Clock>) -> Self {
        let endpoint = Endpoint {
            host: config.host.clone(),
            port: config.port,
            unit: config.unit,
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
        };
        let slots = match &config.slots {
            Some(list) => Slots::List(list.clone()),
            None => Slots::Walk(config.max_slots),
        };
        ModbusSource {
            link: Link::new(endpoint),
            blocks: map.blocks(),
            map,
            slots,
            rediscover_every: config.rediscover_every,
            discovery_retry: config.discovery_retry,
            meters: Vec::new(),
            next_discovery: Instant::now(),
            clock,
            errors: ErrorLog::new(),
        }
    }

    /// The meters known now, as (slot, meter ID).
    pub fn meters(&self) -> Vec<(u16, MeterId)> {
        self.meters.iter().map(|m| (m.slot, m.id.clone())).collect()
    }

    /// How many TCP connections have been opened so far.
    pub fn connects(&self) -> u64 {
        self.link.connects()
    }

    /// Reads every known meter once (discovering first when due).
    pub async fn read_all(&mut self) -> Vec<Reading> {
        if Instant::now() >= self.next_discovery {
            self.discover().await;
        }
        let gateway = self.link.endpoint().to_string();
        let mut readings = Vec::new();
        let mut replaced = false;
        for index in 0..self.meters.len() {
            let meter = self.meters[index].clone();
            let key = format!("{} (slot {})", meter.id, meter.slot);
            let registers = match self.read_slot(meter.slot).await {
                Ok(registers) => registers,
                Err(e) if e.is_unreachable() => {
                    // Every other meter would fail the same way: one line for the gateway.
                    self.errors.failed(&gateway, &e);
                    break;
                }
                Err(e) => {
                    self.errors.failed(&key, &e);
                    continue;
                }
            };
            self.errors.succeeded(&gateway);
            // The timestamp of this meter, not of the poll.
            let ts_ms = self.clock.now_ms();
            let clock = self.clock.state();
            let serial = self.serial_in(&registers);
            if serial != Some(meter.serial) {
                replaced = true;
                tracing::info!(slot = meter.slot, was = %meter.id, now = ?serial, "the meter in this slot changed; discovering again");
                continue;
            }
            self.errors.succeeded(&key);
            for field in &self.map.channels {
                let Some(words) = registers.get(field.offset, field.words) else {
                    continue;
                };
                match field.decode(words) {
                    Ok(value) => readings.push(Reading {
                        meter: meter.id.clone(),
                        channel: field.channel,
                        ts_ms,
                        value,
                        scale: field.scale,
                        clock,
                    }),
                    Err(e) => {
                        let key = format!("{key} {}", field.channel.name());
                        self.errors.failed(&key, &e);
                    }
                }
            }
        }
        if replaced {
            self.next_discovery = Instant::now();
        }
        readings
    }

    async fn discover(&mut self) {
        let found = self.walk().await;
        let now = Instant::now();
        let meters = match found {
            Discovered::Failed => {
                // Keep reading the meters known so far; try again soon.
                self.next_discovery = now + self.discovery_retry;
                return;
            }
            Discovered::Partial(meters) => {
                self.next_discovery = now + self.discovery_retry;
                meters
            }
            Discovered::Complete(meters) if meters.is_empty() => {
                // A gateway that is still scanning its M-Bus after a power cut shows no meters.
                self.next_discovery = now + self.discovery_retry;
                meters
            }
            Discovered::Complete(meters) => {
                self.next_discovery = now + self.rediscover_every;
                meters
            }
        };
        if meters != self.meters {
            let list: Vec<String> = meters
                .iter()
                .map(|m| format!("{}@{}", m.id, m.slot))
                .collect();
            tracing::info!(
                gateway = %self.link.endpoint(),
                map = %self.map.name,
                meters = ?list,
                "discovered {} meters",
                meters.len()
            );
        }
        self.meters = meters;
    }

    async fn walk(&mut self) -> Discovered {
        let (slots, walking): (Vec<u16>, bool) = match &self.slots {
            Slots::Walk(max) => ((0..*max).collect(), true),
            Slots::List(list) => (list.clone(), false),
        };
        let mut found: Vec<Meter> = Vec::new();
        let mut complete = true;
        for slot in slots {
            let key = format!("{} slot {slot}", self.link.endpoint());
            let serial = match self.read_serial(slot).await {
                Ok(Some(serial)) => serial,
                Ok(None) if walking => break,
                Ok(None) => continue,
                Err(LinkError::Exception(ExceptionCode::IllegalDataAddress)) if walking => break,
                Err(e @ LinkError::Exception(_)) => {
                    self.errors.failed(&key, &e);
                    complete = false;
                    continue;
                }
                Err(e) => {
                    self.errors.failed(&self.link.endpoint().to_string(), &e);
                    return Discovered::Failed;
                }
            };
            self.errors.succeeded(&key);
            if found.iter().any(|m| m.serial == serial) {
                tracing::warn!(
                    slot,
                    serial,
                    "a serial number appears in two slots; reading the first only"
                );
                continue;
            }
            found.push(Meter {
                slot,
                serial,
                id: ModbusSourceConfig::meter_id(serial),
            });
        }
        if complete {
            Discovered::Complete(found)
        } else {
            Discovered::Partial(found)
        }
    }

    /// The serial number in `slot`, `None` when the slot is empty or past the register space.
    async fn read_serial(&mut self, slot: u16) -> Result<Option<u64>, LinkError> {
        let serial = &self.map.serial;
        let Some(address) = self
            .map
            .slot_start(slot)
            .and_then(|start| start.checked_add(serial.offset))
        else {
            return Ok(None);
        };
        let (words, order) = (serial.words, serial.word_order);
        let registers = self.link.read(self.map.registers, address, words).await?;
        let value = maps::join_words(&registers[..usize::from(words)], order);
        Ok((!maps::is_empty_serial(value, words)).then_some(value))
    }

    /// Every block of `slot` (serial number and values).
    async fn read_slot(&mut self, slot: u16) -> Result<SlotRegisters, LinkError> {
        let start = self
            .map
            .slot_start(slot)
            .ok_or(LinkError::Exception(ExceptionCode::IllegalDataAddress))?;
        let mut registers = SlotRegisters::default();
        for (offset, count) in self.blocks.clone() {
            let address = start
                .checked_add(offset)
                .ok_or(LinkError::Exception(ExceptionCode::IllegalDataAddress))?;
            let words = self.link.read(self.map.registers, address, count).await?;
            registers.push(offset, words);
        }
        Ok(registers)
    }

    /// The serial number in a slot's registers, `None` when the slot is now empty.
    fn serial_in(&self, registers: &SlotRegisters) -> Option<u64> {
        let serial = &self.map.serial;
        let words = registers.get(serial.offset, serial.words)?;
        let value = maps::join_words(words, serial.word_order);
        (!maps::is_empty_serial(value, serial.words)).then_some(value)
    }
}

impl Source for ModbusSource {
    async fn poll(&mut self) -> Vec<Reading> {
        self.read_all().await
    }

    async fn stop(&mut self) {
        self.link.disconnect();
    }
}
