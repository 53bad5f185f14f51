// Drives Waha with fhir-kit-client (npm), as a JavaScript app would; prints what it saw as JSON.
// Run by tests/clients/test_fhir_kit_client.py with WAHA_FHIR_BASE, WAHA_TOKEN and WAHA_NATIONAL_ID.
import { randomUUID } from 'node:crypto';
import { Client } from 'fhir-kit-client';

const client = new Client({ baseUrl: process.env.WAHA_FHIR_BASE, bearerToken: process.env.WAHA_TOKEN });
const nationalId = process.env.WAHA_NATIONAL_ID;
const seen = {};

const statement = await client.capabilityStatement();
seen.fhirVersion = statement.fhirVersion;
const smart = await client.smartAuthMetadata();
seen.tokenUrl = smart.tokenUrl ? String(smart.tokenUrl) : null;

const created = await client.create({
  resourceType: 'Patient',
  body: {
    resourceType: 'Patient',
    identifier: [{ system: 'https://waha.health/fhir/sid/national-id', value: nationalId }],
    name: [{ family: 'El Idrissi', given: ['Fatima'] }],
    gender: 'female',
    birthDate: '1961-04-02',
  },
});
const read = await client.read({ resourceType: 'Patient', id: created.id });
seen.readFamily = read.name[0].family;
const updated = await client.update({ resourceType: 'Patient', id: created.id, body: { ...read, gender: 'male' } });
seen.updatedVersion = updated.meta.versionId;
const patched = await client.patch({
  resourceType: 'Patient',
  id: created.id,
  jsonPatch: [{ op: 'replace', path: '/gender', value: 'other' }],
});
seen.patchedGender = patched.gender;

const pulse = (value) => ({
  fullUrl: `urn:uuid:${randomUUID()}`,
  resource: {
    resourceType: 'Observation',
    status: 'final',
    code: { coding: [{ system: 'http://loinc.org', code: '8867-4' }] },
    subject: { reference: `Patient/${created.id}` },
    effectiveDateTime: '2026-11-20T09:00:00Z',
    valueQuantity: { value, unit: '/min', system: 'http://unitsofmeasure.org', code: '/min' },
  },
  request: { method: 'POST', url: 'Observation' },
});
const answer = await client.transaction({
  body: { resourceType: 'Bundle', type: 'transaction', entry: [pulse(70), pulse(72), pulse(74)] },
});
seen.transactionStatuses = answer.entry.map((entry) => entry.response.status);

const paged = [];
let page = await client.search({
  resourceType: 'Observation',
  searchParams: { subject: `Patient/${created.id}`, code: 'http://loinc.org|8867-4', _count: 2 },
});
while (page) {
  paged.push(...(page.entry ?? []).map((entry) => entry.resource.id));
  page = await client.nextPage({ bundle: page });
}
seen.pagedObservations = paged.length;
const compartment = await client.compartmentSearch({
  resourceType: 'Observation',
  compartment: { resourceType: 'Patient', id: created.id },
  searchParams: { _count: 10 },
});
seen.compartmentObservations = (compartment.entry ?? []).length;

const history = await client.history({ resourceType: 'Patient', id: created.id });
seen.historyVersions = history.entry.map((entry) => entry.resource.meta.versionId);
await client.delete({ resourceType: 'Observation', id: paged[0] });
try {
  await client.read({ resourceType: 'Observation', id: paged[0] });
  seen.readDeleted = 'found';
} catch (error) {
  seen.readDeleted = error.response.status;
}
try {
  await client.read({ resourceType: 'Patient', id: 'nobody-here' });
  seen.readMissing = 'found';
} catch (error) {
  seen.readMissing = [error.response.status, error.response.data.resourceType];
}
console.log(JSON.stringify(seen));
