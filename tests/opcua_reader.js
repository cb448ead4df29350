// An OPC UA client that is not built on asyncua (node-opcua), for the station tests: connects
// to ENDPOINT, finds the station's namespace, optionally calls METHOD(ARG) on the station object,
// reads the listed variables and prints them as one JSON object.
// usage: node opcua_reader.js ENDPOINT STATION "Var1,LastResult.Json" [METHOD ARG]
const { OPCUAClient, AttributeIds, DataType, MessageSecurityMode, SecurityPolicy } =
    require("node-opcua-client");

async function main() {
    const [endpoint, station, names, method, arg] = process.argv.slice(2);
    const client = OPCUAClient.create({
        endpointMustExist: false, securityMode: MessageSecurityMode.None,
        securityPolicy: SecurityPolicy.None, connectionStrategy: { maxRetry: 2 },
    });
    await client.connect(endpoint);
    const session = await client.createSession();
    const spaces = (await session.read({ nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value }))
        .value.value;
    const ns = spaces.indexOf(`urn:clipinspect:station:${station}`);
    if (ns < 0) throw new Error(`namespace of station ${station} not found in ${spaces}`);
    const out = {};
    if (method) {
        const result = await session.call({
            objectId: `ns=${ns};s=${station}`, methodId: `ns=${ns};s=${station}.${method}`,
            inputArguments: [{ dataType: DataType.String, value: arg }],
        });
        out[method] = result.outputArguments.map((v) => v.value);
        out[`${method}.status`] = result.statusCode.name;
    }
    for (const name of names.split(",").filter((n) => n)) {
        const dv = await session.read({ nodeId: `ns=${ns};s=${station}.${name}`,
                                        attributeId: AttributeIds.Value });
        const v = dv.value.value;
        out[name] = typeof v === "bigint" ? Number(v) : (v && v.length === 2 && typeof v[0] ===
            "number" && name.match(/Heartbeat|Parts|Misses|Sequence/) ? v[0] * 2 ** 32 + v[1] : v);
    }
    await session.close();
    await client.disconnect();
    console.log(JSON.stringify(out));
}
main().catch((e) => { console.error(String(e)); process.exit(1); });
